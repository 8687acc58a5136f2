//! Creating persistent TAP devices through `/dev/net/tun`. Netlink can create a `tun` link too,
//! but the ioctl path is the one QEMU and Firecracker themselves use, so a device made here is
//! guaranteed to accept their `TUNSETIFF` later. The device is made in the network namespace of
//! the calling thread.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;

use banger_core::net::MAX_IFNAME_LEN;

/// `struct ifreq` as the tun driver reads it: the name, then the flags in the union, padded to
/// the kernel's 40 bytes.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

// The request numbers of <linux/if_tun.h>: _IOW('T', 202..204, int).
nix::ioctl_write_ptr_bad!(tun_set_iff, nix::request_code_write!(b'T', 202, std::mem::size_of::<libc::c_int>()), IfReq);
nix::ioctl_write_int_bad!(tun_set_persist, nix::request_code_write!(b'T', 203, std::mem::size_of::<libc::c_int>()));
nix::ioctl_write_int_bad!(tun_set_owner, nix::request_code_write!(b'T', 204, std::mem::size_of::<libc::c_int>()));

/// Creates (or, if a persistent TAP of that name exists, re-opens) the TAP device `name`, makes
/// it persistent and, when `owner` is given, owned by that uid. The fd is closed on return; the
/// device stays until deleted.
pub(super) fn create_persistent_tap(name: &str, owner: Option<u32>) -> io::Result<()> {
    if name.is_empty() || name.len() > MAX_IFNAME_LEN || name.contains('\0') {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "interface name must be 1 to 15 bytes"));
    }
    let tun = OpenOptions::new().read(true).write(true).open("/dev/net/tun")?;
    let mut req = IfReq { name: [0; 16], flags: 0, _pad: [0; 22] };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    let flags = libc::IFF_TAP | libc::IFF_NO_PI;
    req.flags = libc::c_short::try_from(flags).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let fd = tun.as_raw_fd();
    // SAFETY: `fd` is an open /dev/net/tun descriptor owned by `tun`, which outlives the call;
    // `req` is a properly sized, NUL-terminated `struct ifreq` that the kernel only reads and
    // writes within its 40 bytes.
    unsafe { tun_set_iff(fd, &req) }?;
    // SAFETY: same descriptor, now bound to the device; TUNSETPERSIST takes its argument by value.
    unsafe { tun_set_persist(fd, 1) }?;
    if let Some(uid) = owner {
        let uid = libc::c_int::try_from(uid).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: same descriptor; TUNSETOWNER takes the uid by value.
        unsafe { tun_set_owner(fd, uid) }?;
    }
    Ok(())
}
