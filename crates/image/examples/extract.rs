//! Manual check against a real kernel package: extract it, order the guest modules, build the
//! guest initramfs, and print timings and sizes.
//!
//! `cargo run -p banger-image --example extract -- PACKAGE.deb DEST [INIT]`
//! (INIT defaults to `/bin/true`, standing in for the guest agent).

use std::path::PathBuf;
use std::time::Instant;

use banger_image::initramfs::build_guest_initramfs;
use banger_image::kernel::{extract_kernel_deb, extract_vmlinux};
use banger_image::modinfo::ModuleIndex;

const GUEST_MODULES: [&str; 7] =
    ["virtio_mmio", "virtio_blk", "virtio_net", "virtio_console", "overlay", "vsock", "vmw_vsock_virtio_transport"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args_os().skip(1).map(PathBuf::from);
    let (Some(deb), Some(dest)) = (args.next(), args.next()) else {
        return Err("usage: extract PACKAGE.deb DEST [INIT]".into());
    };
    let init = args.next().unwrap_or_else(|| PathBuf::from("/bin/true"));

    let start = Instant::now();
    let kernel = extract_kernel_deb(&deb, &dest)?;
    println!("extract: {:.2?}", start.elapsed());
    println!("release: {}", kernel.release);
    for path in [&kernel.vmlinuz, &kernel.vmlinux] {
        println!("{}: {} bytes", path.display(), std::fs::metadata(path)?.len());
    }
    println!("module tree files: {}", kernel.module_tree_files);

    let image = std::fs::read(&kernel.vmlinuz)?;
    let start = Instant::now();
    let elf = extract_vmlinux(&image)?;
    println!("vmlinux alone (part of extract): {:.2?}, {} bytes", start.elapsed(), elf.len());

    let start = Instant::now();
    let mut index = ModuleIndex::scan(&kernel.modules)?;
    if let Some(config) = &kernel.config {
        index = index.with_config(config)?;
    }
    let order = index.load_order(&GUEST_MODULES)?;
    println!("scan + order: {:.2?} ({} modules indexed)", start.elapsed(), index.len());
    for module in &order.modules {
        println!("  {} ({}) depends=[{}]", module.name, module.relative.display(), module.depends.join(","));
    }
    println!("built in: {:?}", order.builtin);
    println!("ext4 built in: {}", index.is_builtin("ext4"));

    let start = Instant::now();
    let out = dest.join("initramfs.cpio.gz");
    let summary = build_guest_initramfs(&init, &kernel.release, &order.modules, &out)?;
    println!(
        "initramfs: {:.2?}, {} entries, cpio {} bytes, gzip {} bytes",
        start.elapsed(),
        summary.entries,
        summary.cpio_bytes,
        summary.gzip_bytes
    );
    Ok(())
}
