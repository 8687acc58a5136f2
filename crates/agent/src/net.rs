//! Guest networking at boot (the kernel has no `ip=` support): `lo` up always; with
//! `banger.ip=ADDR/PREFIX` also `eth0` addressed and up, a default route via `banger.gw`, and
//! `banger.dns` written to /etc/resolv.conf. IPv4 only, through the classic socket ioctls
//! (no netlink library needed for this much).

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;

/// A network setup step that failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// `banger.ip` or `banger.gw` does not parse.
    #[error("bad address '{0}' (expected IPv4 ADDR/PREFIX, e.g. 172.16.0.2/24)")]
    BadAddress(String),
    /// The interface did not appear.
    #[error("interface {0} did not appear (is virtio_net loaded and a NIC attached?)")]
    NoInterface(String),
    /// A socket ioctl failed.
    #[error("cannot {what} on {iface}")]
    Ioctl {
        /// The step.
        what: &'static str,
        /// The interface.
        iface: String,
        /// Why.
        #[source]
        errno: Errno,
    },
}

/// `struct ifreq`: the name and a union we use as a sockaddr or flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; 24],
}

/// `struct rtentry` (x86_64 layout; libc does not have it for glibc).
#[repr(C)]
struct RtEntry {
    pad1: libc::c_ulong,
    dst: libc::sockaddr,
    gateway: libc::sockaddr,
    genmask: libc::sockaddr,
    flags: libc::c_ushort,
    pad2: libc::c_short,
    pad3: libc::c_ulong,
    pad4: *mut libc::c_void,
    metric: libc::c_short,
    dev: *mut libc::c_char,
    mtu: libc::c_ulong,
    window: libc::c_ulong,
    irtt: libc::c_ushort,
}

/// `AF_INET` as `sa_family_t` (2 fits).
const AF_INET: libc::sa_family_t = 2;
/// `ARPHRD_ETHER` as `sa_family_t`.
const ARPHRD_ETHER: libc::sa_family_t = 1;
/// `IFF_UP | IFF_RUNNING` in the 16-bit `ifr_flags`.
const IFF_UP_RUNNING: i16 = 0x1 | 0x40;

fn sockaddr(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: AF_INET,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(addr.octets()) },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16 plain bytes.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ifreq(iface: &str) -> IfReq {
    let mut req = IfReq { name: [0; libc::IFNAMSIZ], data: [0; 24] };
    let n = iface.len().min(libc::IFNAMSIZ - 1);
    req.name[..n].copy_from_slice(&iface.as_bytes()[..n]);
    req
}

struct Socket(OwnedFd);

impl Socket {
    fn new() -> Result<Self, NetError> {
        // SAFETY: plain socket(2) call; the fd is owned right away.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(NetError::Ioctl { what: "open a socket", iface: String::new(), errno: Errno::last() });
        }
        // SAFETY: `socket` just returned this fd and nothing else owns it.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn ioctl<T>(&self, request: libc::c_ulong, arg: &mut T, what: &'static str, iface: &str) -> Result<(), NetError> {
        // SAFETY: `arg` is a live, correctly laid-out struct for `request`.
        let rc = unsafe { libc::ioctl(self.0.as_raw_fd(), request, std::ptr::from_mut(arg)) };
        if rc < 0 {
            return Err(NetError::Ioctl { what, iface: iface.to_owned(), errno: Errno::last() });
        }
        Ok(())
    }

    fn up(&self, iface: &str) -> Result<(), NetError> {
        let mut req = ifreq(iface);
        self.ioctl(libc::SIOCGIFFLAGS, &mut req, "read flags", iface)?;
        let flags = i16::from_ne_bytes([req.data[0], req.data[1]]) | IFF_UP_RUNNING;
        req.data[..2].copy_from_slice(&flags.to_ne_bytes());
        self.ioctl(libc::SIOCSIFFLAGS, &mut req, "bring up", iface)
    }

    fn down(&self, iface: &str) -> Result<(), NetError> {
        let mut req = ifreq(iface);
        self.ioctl(libc::SIOCGIFFLAGS, &mut req, "read flags", iface)?;
        let flags = i16::from_ne_bytes([req.data[0], req.data[1]]) & !IFF_UP_RUNNING;
        req.data[..2].copy_from_slice(&flags.to_ne_bytes());
        self.ioctl(libc::SIOCSIFFLAGS, &mut req, "bring down", iface)
    }

    fn set_mac(&self, iface: &str, mac: [u8; 6]) -> Result<(), NetError> {
        let mut req = ifreq(iface);
        // A sockaddr: the family (ARPHRD_ETHER), then the address in sa_data.
        req.data[..2].copy_from_slice(&ARPHRD_ETHER.to_ne_bytes());
        req.data[2..8].copy_from_slice(&mac);
        self.ioctl(libc::SIOCSIFHWADDR, &mut req, "set the mac address", iface)
    }

    fn set_addr(
        &self,
        iface: &str,
        request: libc::c_ulong,
        addr: Ipv4Addr,
        what: &'static str,
    ) -> Result<(), NetError> {
        let mut req = ifreq(iface);
        let sa = sockaddr(addr);
        // SAFETY: sockaddr is 16 plain bytes; data has room for 24.
        let bytes: [u8; 16] = unsafe { std::mem::transmute::<libc::sockaddr, [u8; 16]>(sa) };
        req.data[..16].copy_from_slice(&bytes);
        self.ioctl(request, &mut req, what, iface)
    }
}

/// Brings up the loopback interface.
pub fn loopback_up() -> Result<(), NetError> {
    Socket::new()?.up("lo")
}

/// `ADDR/PREFIX` → address and netmask.
pub fn parse_cidr(text: &str) -> Result<(Ipv4Addr, Ipv4Addr), NetError> {
    let bad = || NetError::BadAddress(text.to_owned());
    let (addr, prefix) = text.split_once('/').unwrap_or((text, "24"));
    let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
    let prefix: u32 = prefix.parse().ok().filter(|p| *p <= 32).ok_or_else(bad)?;
    let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) };
    Ok((addr, Ipv4Addr::from(mask)))
}

/// Addresses `iface`, brings it up and adds a default route via `gateway`.
pub fn configure(iface: &str, cidr: &str, gateway: Option<&str>) -> Result<(), NetError> {
    let (addr, mask) = parse_cidr(cidr)?;
    let gateway: Option<Ipv4Addr> =
        gateway.map(|g| g.parse().map_err(|_| NetError::BadAddress(g.to_owned()))).transpose()?;
    let start = Instant::now();
    while !std::path::Path::new("/sys/class/net").join(iface).exists() {
        if start.elapsed() > Duration::from_secs(5) {
            return Err(NetError::NoInterface(iface.to_owned()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let socket = Socket::new()?;
    socket.set_addr(iface, libc::SIOCSIFADDR, addr, "set the address")?;
    socket.set_addr(iface, libc::SIOCSIFNETMASK, mask, "set the netmask")?;
    socket.up(iface)?;
    if let Some(gateway) = gateway {
        let any = sockaddr(Ipv4Addr::UNSPECIFIED);
        let mut route = RtEntry {
            pad1: 0,
            dst: any,
            gateway: sockaddr(gateway),
            genmask: any,
            flags: libc::RTF_UP | libc::RTF_GATEWAY,
            pad2: 0,
            pad3: 0,
            pad4: std::ptr::null_mut(),
            metric: 0,
            dev: std::ptr::null_mut(),
            mtu: 0,
            window: 0,
            irtt: 0,
        };
        match socket.ioctl(libc::SIOCADDRT, &mut route, "add the default route", iface) {
            Err(NetError::Ioctl { errno: Errno::EEXIST, .. }) | Ok(()) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `aa:bb:cc:dd:ee:ff` → bytes.
pub fn parse_mac(text: &str) -> Result<[u8; 6], NetError> {
    let bad = || NetError::BadAddress(text.to_owned());
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next().filter(|p| p.len() == 2).ok_or_else(bad)?;
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() || mac[0] & 1 == 1 {
        return Err(bad());
    }
    Ok(mac)
}

/// Gives a configured `iface` a new MAC and address: down (which drops its routes and
/// neighbours), the new MAC, then [`configure`] as at boot.
pub fn readdress(iface: &str, mac: &str, cidr: &str, gateway: Option<&str>) -> Result<(), NetError> {
    let mac = parse_mac(mac)?;
    parse_cidr(cidr)?;
    let socket = Socket::new()?;
    // virtio-net takes a new address while up (IFF_LIVE_ADDR_CHANGE); a down/up cycle costs a
    // restored guest tens of milliseconds under TCG. Drivers that refuse say EBUSY.
    match socket.set_mac(iface, mac) {
        Err(NetError::Ioctl { errno: Errno::EBUSY, .. }) => {
            socket.down(iface)?;
            socket.set_mac(iface, mac)?;
        }
        other => other?,
    }
    configure(iface, cidr, gateway)
}

/// Writes /etc/resolv.conf naming `dns`.
pub fn write_resolv_conf(dns: &str) -> std::io::Result<()> {
    let text: String = dns.split(',').filter(|s| !s.is_empty()).map(|s| format!("nameserver {s}\n")).collect();
    // A symlink (systemd-resolved's stub) would send the write elsewhere.
    let _ = std::fs::remove_file("/etc/resolv.conf");
    std::fs::write("/etc/resolv.conf", text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_to_address_and_mask() {
        let (addr, mask) = parse_cidr("172.16.0.2/24").expect("cidr");
        assert_eq!((addr, mask), (Ipv4Addr::new(172, 16, 0, 2), Ipv4Addr::new(255, 255, 255, 0)));
        assert_eq!(parse_cidr("10.0.0.1/30").expect("cidr").1, Ipv4Addr::new(255, 255, 255, 252));
        assert!(parse_cidr("10.0.0.1/33").is_err());
        assert!(parse_cidr("nope/8").is_err());
    }

    #[test]
    fn macs_parse() {
        assert_eq!(parse_mac("52:54:00:ab:cd:ef").expect("mac"), [0x52, 0x54, 0, 0xab, 0xcd, 0xef]);
        for bad in
            ["52:54:00:ab:cd", "52:54:00:ab:cd:ef:01", "zz:54:00:ab:cd:ef", "01:00:00:00:00:00", "5:54:0:ab:cd:ef"]
        {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn structs_match_the_kernel_layout() {
        assert_eq!(i32::from(AF_INET), libc::AF_INET);
        assert_eq!(i32::from(IFF_UP_RUNNING), libc::IFF_UP | libc::IFF_RUNNING);
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
        assert_eq!(std::mem::size_of::<RtEntry>(), 120);
    }
}
