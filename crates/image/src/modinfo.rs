//! Kernel modules: read `.modinfo` from `.ko` files and order modules for loading.
//!
//! Debian's kernel packages ship no `modules.dep`, so the order is computed here: every module's
//! `.modinfo` ELF section is a list of NUL-terminated `key=value` strings, and `depends=` names
//! the modules it needs loaded first. Names treat `-` and `_` alike (the kernel does too), so
//! names are normalised to `_`. Modules built into the kernel (listed in `modules.builtin` or
//! `modules.builtin.modinfo`, or `=y` in the kernel config) need no loading and are skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use object::read::elf::ElfFile64;
use object::{Endianness, Object, ObjectSection};

/// File name suffixes of kernel modules, uncompressed first.
const MODULE_SUFFIXES: [&str; 4] = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"];

/// What a module's `.modinfo` section says about it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModInfo {
    /// `name=`, normalised; modern kernels always set it.
    pub name: Option<String>,
    /// `depends=`, normalised, in the order listed.
    pub depends: Vec<String>,
    /// `vermagic=`: kernel release and build options the module was built for.
    pub vermagic: Option<String>,
}

/// What went wrong reading one module file.
#[derive(Debug, thiserror::Error)]
pub enum ModinfoError {
    /// The file could not be read or decompressed.
    #[error("cannot read kernel module {}", path.display())]
    Read {
        /// The module file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file is not an ELF64 object.
    #[error("{} is not a kernel module (not an ELF64 file)", path.display())]
    NotElf {
        /// The module file.
        path: PathBuf,
        /// The parser's complaint.
        #[source]
        source: object::Error,
    },
    /// The file has no `.modinfo` section.
    #[error("{} is not a kernel module (no .modinfo section)", path.display())]
    NoModinfo {
        /// The module file.
        path: PathBuf,
    },
}

/// What went wrong indexing a module tree.
#[derive(Debug, thiserror::Error)]
pub enum ScanModulesError {
    /// A directory or index file of the tree could not be read.
    #[error("cannot read the module tree at {}; extract the kernel package again", path.display())]
    Read {
        /// The directory or file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// What went wrong computing a load order.
#[derive(Debug, thiserror::Error)]
pub enum LoadOrderError {
    /// A requested module is neither in the tree nor built in.
    #[error(
        "kernel module '{name}' is neither in {} nor built into the kernel; \
         check the name or use a kernel that provides it",
        root.display()
    )]
    NotFound {
        /// The module.
        name: String,
        /// The module tree searched.
        root: PathBuf,
    },
    /// A dependency is neither in the tree nor built in.
    #[error(
        "kernel module '{name}' needs '{dependency}', which is neither in {} nor built into the \
         kernel; the module tree is incomplete, extract the kernel package again",
        root.display()
    )]
    MissingDependency {
        /// The module that needs it.
        name: String,
        /// The missing dependency.
        dependency: String,
        /// The module tree searched.
        root: PathBuf,
    },
    /// Modules depend on each other in a circle.
    #[error("kernel modules depend on each other in a cycle: {}", cycle.join(" -> "))]
    Cycle {
        /// The modules in the cycle, the first repeated at the end.
        cycle: Vec<String>,
    },
    /// A module file could not be read.
    #[error(transparent)]
    Modinfo(#[from] ModinfoError),
}

/// A module to load, with what it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderedModule {
    /// Normalised module name.
    pub name: String,
    /// Path of the module file relative to the module tree root (as in the kernel package).
    pub relative: PathBuf,
    /// Full path of the module file.
    pub path: PathBuf,
    /// Modules it needs, from `depends=` (some may be built in).
    pub depends: Vec<String>,
}

/// The result of [`ModuleIndex::load_order`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadOrder {
    /// Modules to load, each after everything it depends on.
    pub modules: Vec<OrderedModule>,
    /// Requested or needed modules that are built into the kernel, sorted.
    pub builtin: Vec<String>,
}

/// Normalises a module name: the kernel treats `-` and `_` alike, we use `_`.
pub fn normalize_module_name(name: &str) -> String {
    name.replace('-', "_")
}

/// Parses the contents of a `.modinfo` section.
pub fn parse_modinfo(section: &[u8]) -> ModInfo {
    let mut info = ModInfo::default();
    for entry in section.split(|&b| b == 0) {
        let entry = String::from_utf8_lossy(entry);
        let Some((key, value)) = entry.split_once('=') else {
            continue;
        };
        match key {
            "name" => info.name = Some(normalize_module_name(value)),
            "depends" => {
                info.depends = value.split(',').filter(|d| !d.is_empty()).map(normalize_module_name).collect();
            }
            "vermagic" => info.vermagic = Some(value.to_owned()),
            _ => {}
        }
    }
    info
}

/// Reads the `.modinfo` of an uncompressed module image; `path` is only for messages.
pub fn modinfo_of(path: &Path, ko: &[u8]) -> Result<ModInfo, ModinfoError> {
    let elf =
        ElfFile64::<Endianness>::parse(ko).map_err(|source| ModinfoError::NotElf { path: path.into(), source })?;
    let section = elf.section_by_name(".modinfo").ok_or_else(|| ModinfoError::NoModinfo { path: path.into() })?;
    let data = section.data().map_err(|source| ModinfoError::NotElf { path: path.into(), source })?;
    Ok(parse_modinfo(data))
}

/// Reads a module file, decompressing `.ko.xz`, `.ko.zst` and `.ko.gz`.
///
/// The initramfs stores modules uncompressed so the guest can load them with plain
/// `finit_module`, whatever the kernel's decompression support.
pub fn read_module_file(path: &Path) -> Result<Vec<u8>, ModinfoError> {
    let read_error = |source| ModinfoError::Read { path: path.into(), source };
    let raw = fs::read(path).map_err(read_error)?;
    let name = path.as_os_str().to_string_lossy();
    let mut out = Vec::new();
    if name.ends_with(".xz") {
        xz2::read::XzDecoder::new(raw.as_slice()).read_to_end(&mut out).map_err(read_error)?;
    } else if name.ends_with(".zst") {
        out = zstd::decode_all(raw.as_slice()).map_err(read_error)?;
    } else if name.ends_with(".gz") {
        flate2::read::GzDecoder::new(raw.as_slice()).read_to_end(&mut out).map_err(read_error)?;
    } else {
        out = raw;
    }
    Ok(out)
}

/// Returns the normalised module name of a module file name, or `None` if it is not one.
fn module_name_of_file(file_name: &str) -> Option<String> {
    MODULE_SUFFIXES
        .iter()
        .find_map(|suffix| file_name.strip_suffix(suffix))
        .filter(|stem| !stem.is_empty())
        .map(normalize_module_name)
}

/// The modules of one kernel: what is in its module tree and what is built in.
#[derive(Debug, Clone, Default)]
pub struct ModuleIndex {
    root: PathBuf,
    /// Normalised name to path relative to `root`.
    files: BTreeMap<String, PathBuf>,
    /// Normalised names from `modules.builtin` and `modules.builtin.modinfo`.
    builtin: BTreeSet<String>,
    /// `CONFIG_*` symbols set to `y`.
    config_y: BTreeSet<String>,
}

impl ModuleIndex {
    /// Indexes the module tree at `root` (a `lib/modules/<release>` directory, such as the
    /// `modules/` of an extracted kernel), with its `modules.builtin*` lists if present.
    ///
    /// When two files give the same module name, the first in path order wins.
    pub fn scan(root: &Path) -> Result<Self, ScanModulesError> {
        let mut index = Self { root: root.to_owned(), ..Self::default() };
        index.walk(Path::new(""))?;

        let builtin_list = root.join("modules.builtin");
        if let Some(text) = read_optional(&builtin_list)? {
            index
                .builtin
                .extend(text.lines().filter_map(|line| line.rsplit('/').next()).filter_map(module_name_of_file));
        }
        let builtin_modinfo = root.join("modules.builtin.modinfo");
        if let Some(text) = read_optional(&builtin_modinfo)? {
            // NUL-separated `module.key=value` strings.
            index.builtin.extend(
                text.split('\0')
                    .filter_map(|entry| entry.split_once('.'))
                    .map(|(module, _)| normalize_module_name(module))
                    .filter(|module| !module.is_empty()),
            );
        }
        Ok(index)
    }

    /// Also treats as built in every module `NAME` absent from the tree whose `CONFIG_NAME`
    /// (upper-cased) is `=y` in the kernel config at `config`. This is a heuristic for trees
    /// without `modules.builtin`; config symbols do not always match module names.
    pub fn with_config(mut self, config: &Path) -> Result<Self, ScanModulesError> {
        let text =
            fs::read_to_string(config).map_err(|source| ScanModulesError::Read { path: config.into(), source })?;
        self.config_y = text
            .lines()
            .filter_map(|line| line.strip_suffix("=y"))
            .filter(|symbol| symbol.starts_with("CONFIG_"))
            .map(str::to_owned)
            .collect();
        Ok(self)
    }

    fn walk(&mut self, dir: &Path) -> Result<(), ScanModulesError> {
        let full = self.root.join(dir);
        let read_error = |source| ScanModulesError::Read { path: full.clone(), source };
        let mut entries = fs::read_dir(&full)
            .map_err(read_error)?
            .map(|entry| {
                let entry = entry?;
                Ok((entry.file_name(), entry.file_type()?))
            })
            .collect::<io::Result<Vec<_>>>()
            .map_err(read_error)?;
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        for (file_name, file_type) in entries {
            let relative = dir.join(&file_name);
            if file_type.is_dir() {
                self.walk(&relative)?;
            } else if file_type.is_file() {
                let name = file_name.to_str().and_then(module_name_of_file);
                if let Some(name) = name {
                    self.files.entry(name).or_insert(relative);
                }
            }
            // Symlinks (`build`, `source`) lead out of the tree.
        }
        Ok(())
    }

    /// The module tree root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Number of module files in the tree.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Whether the tree holds no module files.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Path of module `name` relative to the root, if the tree has it.
    pub fn find(&self, name: &str) -> Option<&Path> {
        self.files.get(&normalize_module_name(name)).map(PathBuf::as_path)
    }

    /// Whether module `name` is built into the kernel rather than a file in the tree.
    pub fn is_builtin(&self, name: &str) -> bool {
        let name = normalize_module_name(name);
        if self.files.contains_key(&name) {
            return false;
        }
        self.builtin.contains(&name) || self.config_y.contains(&format!("CONFIG_{}", name.to_ascii_uppercase()))
    }

    /// Orders the modules `wanted` and everything they depend on so that each comes after its
    /// dependencies. Requested modules keep their relative order where dependencies allow, and
    /// each module's dependencies are visited in name order, so the result is deterministic.
    pub fn load_order<S: AsRef<str>>(&self, wanted: &[S]) -> Result<LoadOrder, LoadOrderError> {
        let mut walk = OrderWalk {
            index: self,
            state: BTreeMap::new(),
            stack: Vec::new(),
            order: Vec::new(),
            builtin: BTreeSet::new(),
        };
        for name in wanted {
            let name = normalize_module_name(name.as_ref());
            if self.find(&name).is_none() && !self.is_builtin(&name) {
                return Err(LoadOrderError::NotFound { name, root: self.root.clone() });
            }
            walk.visit(&name)?;
        }
        Ok(LoadOrder { modules: walk.order, builtin: walk.builtin.into_iter().collect() })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Visit {
    InProgress,
    Done,
}

/// Depth-first post-order walk over module dependencies.
struct OrderWalk<'a> {
    index: &'a ModuleIndex,
    state: BTreeMap<String, Visit>,
    stack: Vec<String>,
    order: Vec<OrderedModule>,
    builtin: BTreeSet<String>,
}

impl OrderWalk<'_> {
    /// Visits module `name`, known to exist in the tree or to be built in.
    fn visit(&mut self, name: &str) -> Result<(), LoadOrderError> {
        match self.state.get(name) {
            Some(Visit::Done) => return Ok(()),
            Some(Visit::InProgress) => {
                let start = self.stack.iter().position(|n| n == name).unwrap_or(0);
                let mut cycle = self.stack[start..].to_vec();
                cycle.push(name.to_owned());
                return Err(LoadOrderError::Cycle { cycle });
            }
            None => {}
        }
        let Some(relative) = self.index.find(name) else {
            self.builtin.insert(name.to_owned());
            self.state.insert(name.to_owned(), Visit::Done);
            return Ok(());
        };
        self.state.insert(name.to_owned(), Visit::InProgress);
        self.stack.push(name.to_owned());

        let path = self.index.root.join(relative);
        let info = modinfo_of(&path, &read_module_file(&path)?)?;
        let mut depends = info.depends.clone();
        depends.sort();
        depends.dedup();
        for dependency in &depends {
            if self.index.find(dependency).is_none() && !self.index.is_builtin(dependency) {
                return Err(LoadOrderError::MissingDependency {
                    name: name.to_owned(),
                    dependency: dependency.clone(),
                    root: self.index.root.clone(),
                });
            }
            self.visit(dependency)?;
        }

        self.stack.pop();
        self.state.insert(name.to_owned(), Visit::Done);
        self.order.push(OrderedModule {
            name: name.to_owned(),
            relative: relative.to_owned(),
            path,
            depends: info.depends,
        });
        Ok(())
    }
}

/// Reads a text file that may be absent.
fn read_optional(path: &Path) -> Result<Option<String>, ScanModulesError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(String::from_utf8_lossy(&bytes).into_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ScanModulesError::Read { path: path.into(), source }),
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "a failed unwrap fails the test")]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    /// A minimal ELF64 relocatable object whose only section is `.modinfo` holding `modinfo`.
    pub(crate) fn fake_module(modinfo: &str) -> Vec<u8> {
        let shstrtab = b"\0.modinfo\0.shstrtab\0";
        let data_offset = 64u64;
        let strtab_offset = data_offset + modinfo.len() as u64;
        let shoff = (strtab_offset + shstrtab.len() as u64).next_multiple_of(8);

        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2; // ELFCLASS64
        elf[5] = 1; // little endian
        elf[6] = 1; // EV_CURRENT
        elf[0x10..0x12].copy_from_slice(&1u16.to_le_bytes()); // ET_REL
        elf[0x12..0x14].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        elf[0x14..0x18].copy_from_slice(&1u32.to_le_bytes());
        elf[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
        elf[0x34..0x36].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes()); // e_shentsize
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes()); // e_shnum
        elf[0x3e..0x40].copy_from_slice(&2u16.to_le_bytes()); // e_shstrndx
        elf.extend_from_slice(modinfo.as_bytes());
        elf.extend_from_slice(shstrtab);
        elf.resize(usize::try_from(shoff).unwrap(), 0);

        let section = |name: u32, kind: u32, offset: u64, size: u64| {
            let mut sh = vec![0u8; 64];
            sh[0..4].copy_from_slice(&name.to_le_bytes());
            sh[4..8].copy_from_slice(&kind.to_le_bytes());
            sh[0x18..0x20].copy_from_slice(&offset.to_le_bytes());
            sh[0x20..0x28].copy_from_slice(&size.to_le_bytes());
            sh[0x30..0x38].copy_from_slice(&1u64.to_le_bytes()); // sh_addralign
            sh
        };
        elf.extend(section(0, 0, 0, 0));
        elf.extend(section(1, 1, data_offset, modinfo.len() as u64)); // PROGBITS
        elf.extend(section(10, 3, strtab_offset, shstrtab.len() as u64)); // STRTAB
        elf
    }

    /// Writes a module `name` needing `depends` (comma-separated) at `root/relative`.
    pub(crate) fn write_module(root: &Path, relative: &str, name: &str, depends: &str) {
        let path = root.join(relative);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let modinfo = format!(
            "license=GPL\0depends={depends}\0retpoline=Y\0intree=Y\0name={name}\0\
             vermagic=6.1.0-99-cloud-amd64 SMP mod_unload modversions \0\0\0"
        );
        fs::write(path, fake_module(&modinfo)).unwrap();
    }

    /// A module tree shaped like Debian's cloud kernel, for the modules banger loads.
    pub(crate) fn virtio_tree(root: &Path) {
        let mods = [
            ("kernel/drivers/virtio/virtio.ko", "virtio", ""),
            ("kernel/drivers/virtio/virtio_ring.ko", "virtio_ring", ""),
            ("kernel/drivers/virtio/virtio_mmio.ko", "virtio_mmio", "virtio_ring,virtio"),
            ("kernel/drivers/block/virtio_blk.ko", "virtio_blk", "virtio,virtio_ring"),
            ("kernel/net/core/failover.ko", "failover", ""),
            ("kernel/drivers/net/net_failover.ko", "net_failover", "failover"),
            ("kernel/drivers/net/virtio_net.ko", "virtio_net", "net_failover,virtio,virtio_ring"),
            ("kernel/drivers/char/virtio_console.ko", "virtio_console", "virtio,virtio_ring"),
            ("kernel/fs/overlayfs/overlay.ko", "overlay", ""),
            ("kernel/net/vmw_vsock/vsock.ko", "vsock", ""),
            (
                "kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko",
                "vmw_vsock_virtio_transport_common",
                "vsock,virtio,virtio_ring",
            ),
            (
                "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko",
                "vmw_vsock_virtio_transport",
                "vmw_vsock_virtio_transport_common,virtio,virtio_ring,vsock",
            ),
            ("kernel/drivers/virtio/virtio_balloon.ko", "virtio_balloon", "virtio,virtio_ring"),
        ];
        for (relative, name, depends) in mods {
            write_module(root, relative, name, depends);
        }
        fs::write(root.join("modules.builtin"), "kernel/fs/ext4/ext4.ko\nkernel/fs/jbd2/jbd2.ko\n").unwrap();
    }

    pub(crate) const GUEST_MODULES: [&str; 7] =
        ["virtio_mmio", "virtio_blk", "virtio_net", "virtio_console", "overlay", "vsock", "vmw_vsock_virtio_transport"];

    fn names(order: &LoadOrder) -> Vec<&str> {
        order.modules.iter().map(|m| m.name.as_str()).collect()
    }

    #[test]
    fn parses_modinfo_strings() {
        let info = parse_modinfo(
            b"alias=fs-overlay\0license=GPL\0depends=virtio-ring,virtio,\0name=virtio-mmio\0\
              vermagic=6.1.0 SMP\0\0\0\0",
        );
        assert_eq!(info.name.as_deref(), Some("virtio_mmio"));
        assert_eq!(info.depends, ["virtio_ring", "virtio"]);
        assert_eq!(info.vermagic.as_deref(), Some("6.1.0 SMP"));
        assert_eq!(parse_modinfo(b"depends=\0").depends, Vec::<String>::new());
        assert_eq!(parse_modinfo(b""), ModInfo::default());
    }

    #[test]
    fn reads_modinfo_from_elf() {
        let ko = fake_module("depends=a,b-c\0name=x\0");
        let info = modinfo_of(Path::new("x.ko"), &ko).unwrap();
        assert_eq!(info.name.as_deref(), Some("x"));
        assert_eq!(info.depends, ["a", "b_c"]);
    }

    #[test]
    fn rejects_non_modules() {
        let err = modinfo_of(Path::new("a.ko"), b"not elf").unwrap_err();
        assert_eq!(err.to_string(), "a.ko is not a kernel module (not an ELF64 file)");
        let mut ko = fake_module("name=x\0");
        // Rename the section to `.modinfX`.
        let at = ko.windows(8).position(|w| w == b".modinfo").unwrap();
        ko[at + 7] = b'X';
        let err = modinfo_of(Path::new("a.ko"), &ko).unwrap_err();
        assert_eq!(err.to_string(), "a.ko is not a kernel module (no .modinfo section)");
    }

    #[test]
    fn reads_compressed_modules() {
        let dir = tempfile::tempdir().unwrap();
        let ko = fake_module("name=x\0");
        let mut xz = xz2::write::XzEncoder::new(Vec::new(), 1);
        xz.write_all(&ko).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&ko).unwrap();
        let files = [
            ("x.ko", ko.clone()),
            ("x.ko.xz", xz.finish().unwrap()),
            ("x.ko.zst", zstd::encode_all(ko.as_slice(), 1).unwrap()),
            ("x.ko.gz", gz.finish().unwrap()),
        ];
        for (name, contents) in files {
            let path = dir.path().join(name);
            fs::write(&path, contents).unwrap();
            assert_eq!(read_module_file(&path).unwrap(), ko, "{name}");
        }
    }

    #[test]
    fn module_file_names() {
        assert_eq!(module_name_of_file("virtio-mmio.ko").as_deref(), Some("virtio_mmio"));
        assert_eq!(module_name_of_file("overlay.ko.zst").as_deref(), Some("overlay"));
        assert_eq!(module_name_of_file("modules.order"), None);
        assert_eq!(module_name_of_file(".ko"), None);
    }

    #[test]
    fn orders_guest_modules_dependencies_first() {
        let dir = tempfile::tempdir().unwrap();
        virtio_tree(dir.path());
        let index = ModuleIndex::scan(dir.path()).unwrap();
        assert_eq!(index.len(), 13);
        let order = index.load_order(&GUEST_MODULES).unwrap();
        assert_eq!(
            names(&order),
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
            ]
        );
        assert!(order.builtin.is_empty());
        let mmio = &order.modules[2];
        assert_eq!(mmio.relative, Path::new("kernel/drivers/virtio/virtio_mmio.ko"));
        assert_eq!(mmio.path, dir.path().join(&mmio.relative));
        assert_eq!(mmio.depends, ["virtio_ring", "virtio"]);

        // Every module comes after its dependencies, whatever the request order.
        let mut reversed = GUEST_MODULES;
        reversed.reverse();
        let order = index.load_order(&reversed).unwrap();
        for (i, module) in order.modules.iter().enumerate() {
            for dependency in &module.depends {
                let at = order.modules.iter().position(|m| &m.name == dependency);
                assert!(at.is_some_and(|at| at < i), "{} before {dependency}", module.name);
            }
        }
        assert_eq!(order.modules.len(), 12);
    }

    #[test]
    fn dash_and_underscore_are_the_same_module() {
        let dir = tempfile::tempdir().unwrap();
        write_module(dir.path(), "kernel/a/virtio-mmio.ko", "virtio_mmio", "virtio-ring");
        write_module(dir.path(), "kernel/a/virtio_ring.ko", "virtio_ring", "");
        let index = ModuleIndex::scan(dir.path()).unwrap();
        let order = index.load_order(&["virtio-mmio"]).unwrap();
        assert_eq!(names(&order), ["virtio_ring", "virtio_mmio"]);
        assert_eq!(order.modules[1].relative, Path::new("kernel/a/virtio-mmio.ko"));
    }

    #[test]
    fn builtin_modules_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        virtio_tree(dir.path());
        write_module(dir.path(), "kernel/fs/x/needs_ext4.ko", "needs_ext4", "ext4,jbd2");
        let index = ModuleIndex::scan(dir.path()).unwrap();
        assert!(index.is_builtin("ext4"));
        assert!(!index.is_builtin("virtio"));
        let order = index.load_order(&["ext4", "needs_ext4", "overlay"]).unwrap();
        assert_eq!(names(&order), ["needs_ext4", "overlay"]);
        assert_eq!(order.builtin, ["ext4", "jbd2"]);
    }

    #[test]
    fn builtin_from_modinfo_list_and_config() {
        let dir = tempfile::tempdir().unwrap();
        write_module(dir.path(), "kernel/a.ko", "a", "crc32c_generic,virtio_pci");
        fs::write(
            dir.path().join("modules.builtin.modinfo"),
            "crc32c_generic.license=GPL\0crc32c_generic.alias=crc32c\0",
        )
        .unwrap();
        let config = dir.path().join("config");
        fs::write(&config, "CONFIG_VIRTIO_PCI=y\n# CONFIG_B is not set\nCONFIG_C=m\n").unwrap();

        let index = ModuleIndex::scan(dir.path()).unwrap();
        let err = index.load_order(&["a"]).unwrap_err();
        assert!(
            matches!(&err, LoadOrderError::MissingDependency { name, dependency, .. }
                if name == "a" && dependency == "virtio_pci"),
            "{err}"
        );

        let index = index.with_config(&config).unwrap();
        let order = index.load_order(&["a"]).unwrap();
        assert_eq!(names(&order), ["a"]);
        assert_eq!(order.builtin, ["crc32c_generic", "virtio_pci"]);
        assert!(!index.is_builtin("c"));
    }

    #[test]
    fn missing_module_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        virtio_tree(dir.path());
        let index = ModuleIndex::scan(dir.path()).unwrap();
        let err = index.load_order(&["virtio_blk", "9pnet_virtio"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "kernel module '9pnet_virtio' is neither in {} nor built into the kernel; \
                 check the name or use a kernel that provides it",
                dir.path().display()
            )
        );
    }

    #[test]
    fn dependency_cycle_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        write_module(dir.path(), "a.ko", "a", "b");
        write_module(dir.path(), "b.ko", "b", "c");
        write_module(dir.path(), "c.ko", "c", "a");
        let index = ModuleIndex::scan(dir.path()).unwrap();
        let err = index.load_order(&["a"]).unwrap_err();
        assert_eq!(err.to_string(), "kernel modules depend on each other in a cycle: a -> b -> c -> a");
    }

    #[test]
    fn scan_of_a_missing_tree_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = ModuleIndex::scan(&dir.path().join("nope")).unwrap_err();
        assert!(err.to_string().starts_with("cannot read the module tree at"));
    }
}
