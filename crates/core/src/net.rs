//! Pure networking model: the bridge subnet, guest address allocation, MAC derivation from a VM
//! id, and the names banger gives its bridge and TAP devices. No I/O; the effects live in
//! `banger_host::net`.

use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// Default name of banger's bridge.
pub const DEFAULT_BRIDGE: &str = "banger0";
/// Default bridge subnet; the host takes `.1`, guests `.2` upwards.
pub const DEFAULT_SUBNET: &str = "172.30.0.0/20";
/// Longest interface name Linux accepts (`IFNAMSIZ` is 16 including the NUL).
pub const MAX_IFNAME_LEN: usize = 15;
/// Prefix of per-VM TAP devices made on demand: `bgtap0`, `bgtap1`, ...
pub const TAP_PREFIX: &str = "bgtap";
/// Prefix of TAP devices made ahead of time by the warm pool: `bgpool0`, `bgpool1`, ... They are
/// reusable capacity: they outlive the VMs they serve and are handed out again.
pub const POOL_TAP_PREFIX: &str = "bgpool";

/// Why a network value was rejected or could not be produced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetError {
    /// The text is not `A.B.C.D/LEN` with a usable prefix length.
    #[error("invalid subnet '{input}': {reason}")]
    InvalidSubnet {
        /// What was given.
        input: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// Every guest address of the subnet is taken.
    #[error(
        "subnet {subnet} has no free address ({in_use} in use); delete a VM or set bridge_subnet to a larger subnet"
    )]
    Exhausted {
        /// The full subnet.
        subnet: Subnet,
        /// How many guest addresses are in use.
        in_use: usize,
    },
    /// The text cannot be a Linux interface name.
    #[error("invalid interface name '{name}': {reason}")]
    InvalidIfName {
        /// What was given.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },
}

/// An IPv4 subnet in canonical form (no host bits set), with a prefix length of 8 to 30 so
/// that it has a network address, a gateway, at least one guest and a broadcast address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Subnet {
    network: Ipv4Addr,
    prefix_len: u8,
}

impl Subnet {
    /// The subnet `network/prefix_len`; rejects host bits and prefixes outside 8..=30.
    pub fn new(network: Ipv4Addr, prefix_len: u8) -> Result<Self, NetError> {
        let invalid = |reason| NetError::InvalidSubnet { input: format!("{network}/{prefix_len}"), reason };
        if !(8..=30).contains(&prefix_len) {
            return Err(invalid("prefix length must be between 8 and 30"));
        }
        let subnet = Self { network, prefix_len };
        if u32::from(network) & !subnet.mask_bits() != 0 {
            return Err(invalid("host bits are set; use the network address"));
        }
        Ok(subnet)
    }

    fn mask_bits(&self) -> u32 {
        u32::MAX << (32 - u32::from(self.prefix_len))
    }

    /// The network address (`.0` of a /24).
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// The netmask, e.g. `255.255.255.0`.
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.mask_bits())
    }

    /// The host's address on the bridge: the first address after the network address.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// The broadcast address (`.255` of a /24).
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !self.mask_bits())
    }

    /// The first address a guest can get (`.2`).
    pub fn first_guest(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 2)
    }

    /// The last address a guest can get (the one before broadcast).
    pub fn last_guest(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.broadcast()) - 1)
    }

    /// How many guests fit: every address but network, gateway and broadcast.
    pub fn guest_capacity(&self) -> u32 {
        (1u32 << (32 - u32::from(self.prefix_len))) - 3
    }

    /// Whether `addr` is inside the subnet (network and broadcast included).
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & self.mask_bits() == u32::from(self.network)
    }

    /// Whether `addr` may be given to a guest.
    pub fn is_guest_addr(&self, addr: Ipv4Addr) -> bool {
        (self.first_guest()..=self.last_guest()).contains(&addr)
    }
}

impl Default for Subnet {
    fn default() -> Self {
        // A /20: 4,093 guest addresses, so 4,000 VMs fit with the defaults.
        Self { network: Ipv4Addr::new(172, 30, 0, 0), prefix_len: 20 }
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

impl FromStr for Subnet {
    type Err = NetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |reason| NetError::InvalidSubnet { input: s.to_owned(), reason };
        let (addr, len) = s.trim().split_once('/').ok_or_else(|| invalid("expected ADDRESS/PREFIX_LENGTH"))?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| invalid("not an IPv4 address"))?;
        let len: u8 = len.parse().map_err(|_| invalid("prefix length is not a number"))?;
        Subnet::new(addr, len).map_err(|e| match e {
            NetError::InvalidSubnet { reason, .. } => invalid(reason),
            other => other,
        })
    }
}

impl TryFrom<String> for Subnet {
    type Error = NetError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Subnet> for String {
    fn from(s: Subnet) -> Self {
        s.to_string()
    }
}

/// The lowest guest address of `subnet` (from `.2` up) that is not in `used`. Addresses in
/// `used` outside the guest range are ignored, so a released address is simply one that is no
/// longer in `used` and is handed out again. Costs O(number of used addresses).
pub fn allocate(subnet: &Subnet, used: &BTreeSet<Ipv4Addr>) -> Result<Ipv4Addr, NetError> {
    let (first, last) = (subnet.first_guest(), subnet.last_guest());
    let mut candidate = u32::from(first);
    for taken in used.range(first..=last) {
        if u32::from(*taken) != candidate {
            break;
        }
        candidate += 1;
    }
    if candidate <= u32::from(last) {
        Ok(Ipv4Addr::from(candidate))
    } else {
        Err(NetError::Exhausted { subnet: *subnet, in_use: used.range(first..=last).count() })
    }
}

/// The MAC address of a VM's NIC, derived from its id so that it is stable across restarts and
/// needs no storage.
///
/// Derivation (part of the contract; changing it changes every VM's MAC): take the 64-bit FNV-1a
/// hash of the id's UTF-8 bytes, pass it through the SplitMix64 finalizer for diffusion, and use
/// its five most significant bytes (big-endian) after a first octet of `0x02`. `0x02` sets the
/// locally-administered bit and clears the multicast bit, so the address is a unicast address
/// that cannot collide with a vendor-assigned one; 40 bits of hash make collisions between two
/// ids unlikely (about 1 in 10^12 for a pair).
pub fn mac_for(vm_id: &str) -> [u8; 6] {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = vm_id.bytes().fold(FNV_OFFSET, |h, b| (h ^ u64::from(b)).wrapping_mul(FNV_PRIME));
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    let b = h.to_be_bytes();
    [0x02, b[0], b[1], b[2], b[3], b[4]]
}

/// `aa:bb:cc:dd:ee:ff`, lowercase, the form QEMU's `mac=` and `ip link` use.
pub fn format_mac(mac: [u8; 6]) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

/// The name of an on-demand per-VM TAP device, `bgtap{index}`; every `u32` fits in IFNAMSIZ.
pub fn tap_name(index: u32) -> String {
    format!("{TAP_PREFIX}{index}")
}

/// The name of a warm-pool TAP device, `bgpool{index}` (at most 11 characters).
pub fn pool_tap_name(index: u16) -> String {
    format!("{POOL_TAP_PREFIX}{index}")
}

/// The index of a warm-pool TAP device name, if `name` is one (`bgpool7` → 7).
pub fn pool_tap_index(name: &str) -> Option<u16> {
    let digits = name.strip_prefix(POOL_TAP_PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || (digits.len() > 1 && digits.starts_with('0'))
    {
        return None;
    }
    digits.parse().ok()
}

/// Whether `name` is a TAP device banger makes (per-VM or pool), e.g. for leak checks.
pub fn is_banger_tap(name: &str) -> bool {
    let numbered = |prefix: &str| {
        name.strip_prefix(prefix).is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
    };
    numbered(TAP_PREFIX) || numbered(POOL_TAP_PREFIX)
}

/// A valid Linux interface name: 1 to 15 bytes of ASCII letters, digits, `-`, `_` and `.`, not
/// `.` or `..`. Narrower than the kernel's rule so that it can be quoted into nft rules as is.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct IfName(String);

impl IfName {
    /// Checks `name`.
    pub fn new(name: impl Into<String>) -> Result<Self, NetError> {
        let name = name.into();
        let reason = if name.is_empty() {
            Some("it is empty")
        } else if name.len() > MAX_IFNAME_LEN {
            Some("it is longer than 15 bytes")
        } else if name == "." || name == ".." {
            Some("'.' and '..' are reserved")
        } else if !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')) {
            Some("only ASCII letters, digits, '-', '_' and '.' are allowed")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(NetError::InvalidIfName { name, reason }),
            None => Ok(Self(name)),
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for IfName {
    fn default() -> Self {
        Self(DEFAULT_BRIDGE.to_owned())
    }
}

impl fmt::Display for IfName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for IfName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl FromStr for IfName {
    type Err = NetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for IfName {
    type Error = NetError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<IfName> for String {
    fn from(n: IfName) -> Self {
        n.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnet(s: &str) -> Subnet {
        s.parse().expect("valid subnet")
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("valid address")
    }

    #[test]
    fn the_default_subnet_holds_four_thousand_guests() {
        let s = Subnet::default();
        assert_eq!(s.to_string(), DEFAULT_SUBNET);
        assert_eq!(subnet(DEFAULT_SUBNET), s);
        assert_eq!(
            (s.gateway(), s.first_guest(), s.last_guest()),
            (ip("172.30.0.1"), ip("172.30.0.2"), ip("172.30.15.254"))
        );
        assert!(s.guest_capacity() >= 4000, "{}", s.guest_capacity());
        // 3,999 taken (every one from .2 on): the 4,000th still gets an address, the next one up.
        let used: BTreeSet<Ipv4Addr> = (0..3999u32).map(|i| Ipv4Addr::from(u32::from(s.first_guest()) + i)).collect();
        assert_eq!(allocate(&s, &used), Ok(Ipv4Addr::from(u32::from(s.first_guest()) + 3999)));
    }

    #[test]
    fn parses_and_describes_a_subnet() {
        let s = subnet("172.30.0.0/24");
        assert_eq!(s.network(), ip("172.30.0.0"));
        assert_eq!(s.prefix_len(), 24);
        assert_eq!(s.netmask(), ip("255.255.255.0"));
        assert_eq!(s.gateway(), ip("172.30.0.1"));
        assert_eq!(s.first_guest(), ip("172.30.0.2"));
        assert_eq!(s.last_guest(), ip("172.30.0.254"));
        assert_eq!(s.broadcast(), ip("172.30.0.255"));
        assert_eq!(s.guest_capacity(), 253);
        assert!(s.contains(ip("172.30.0.255")) && !s.contains(ip("172.30.1.0")));
        assert!(s.is_guest_addr(ip("172.30.0.2")) && !s.is_guest_addr(ip("172.30.0.1")));
        let wide = subnet(" 10.8.0.0/16 ");
        assert_eq!(wide.broadcast(), ip("10.8.255.255"));
        assert_eq!(wide.guest_capacity(), 65533);
    }

    #[test]
    fn rejects_bad_subnets_with_the_reason() {
        for (input, needle) in [
            ("172.30.0.1/24", "host bits"),
            ("172.30.0.0", "ADDRESS/PREFIX_LENGTH"),
            ("172.30.0/24", "not an IPv4 address"),
            ("172.30.0.0/x", "not a number"),
            ("172.30.0.0/31", "between 8 and 30"),
            ("10.0.0.0/7", "between 8 and 30"),
        ] {
            let err = input.parse::<Subnet>().expect_err(input).to_string();
            assert!(err.contains(needle) && err.contains(input.trim()), "{input}: {err}");
        }
    }

    #[test]
    fn subnet_round_trips_through_serde_as_a_string() {
        let s = subnet("192.168.100.0/28");
        let json = serde_json::to_string(&s).expect("serialize");
        assert_eq!(json, "\"192.168.100.0/28\"");
        assert_eq!(serde_json::from_str::<Subnet>(&json).expect("deserialize"), s);
        assert!(serde_json::from_str::<Subnet>("\"192.168.100.1/28\"").is_err());
    }

    #[test]
    fn allocates_lowest_free_from_dot_two() {
        let s = Subnet::default();
        let mut used = BTreeSet::new();
        assert_eq!(allocate(&s, &used), Ok(ip("172.30.0.2")));
        used.extend([ip("172.30.0.2"), ip("172.30.0.3"), ip("172.30.0.5")]);
        assert_eq!(allocate(&s, &used), Ok(ip("172.30.0.4")));
        used.insert(ip("172.30.0.4"));
        assert_eq!(allocate(&s, &used), Ok(ip("172.30.0.6")));
        // Addresses outside the guest range do not count.
        let outside: BTreeSet<_> = [ip("172.30.0.0"), ip("172.30.0.1"), ip("10.0.0.2")].into();
        assert_eq!(allocate(&s, &outside), Ok(ip("172.30.0.2")));
    }

    #[test]
    fn exhaustion_names_the_fix_and_release_allows_reuse() {
        let s = subnet("172.30.0.0/24");
        let mut used = BTreeSet::new();
        for _ in 0..s.guest_capacity() {
            let a = allocate(&s, &used).expect("capacity left");
            assert!(s.is_guest_addr(a), "{a}");
            assert!(used.insert(a), "{a} handed out twice");
        }
        assert!(!used.contains(&s.network()) && !used.contains(&s.gateway()) && !used.contains(&s.broadcast()));
        let err = allocate(&s, &used).expect_err("full");
        assert_eq!(err, NetError::Exhausted { subnet: s, in_use: 253 });
        assert_eq!(
            err.to_string(),
            "subnet 172.30.0.0/24 has no free address (253 in use); delete a VM or set bridge_subnet to a larger subnet"
        );
        // Deleting a VM releases its address, and the next create gets exactly that one.
        assert!(used.remove(&ip("172.30.0.77")));
        assert_eq!(allocate(&s, &used), Ok(ip("172.30.0.77")));
    }

    #[test]
    fn smallest_subnet_holds_one_guest() {
        let s = subnet("10.0.0.0/30");
        assert_eq!(s.guest_capacity(), 1);
        let used: BTreeSet<_> = [allocate(&s, &BTreeSet::new()).expect("one free")].into();
        assert_eq!(used.first(), Some(&ip("10.0.0.2")));
        assert!(matches!(allocate(&s, &used), Err(NetError::Exhausted { in_use: 1, .. })));
    }

    #[test]
    fn mac_is_local_unicast_stable_and_distinct() {
        let mac = mac_for("01JD5V6Q9ZK3");
        assert_eq!(mac[0] & 0b10, 0b10, "locally administered bit set");
        assert_eq!(mac[0] & 0b01, 0, "unicast (multicast bit clear)");
        assert_eq!(mac, mac_for("01JD5V6Q9ZK3"), "stable");
        // Pinned (cross-checked with an independent implementation) so that a change of the
        // derivation is caught.
        assert_eq!(format_mac(mac_for("")), "02:f5:2a:15:e9:a9");
        assert_eq!(format_mac(mac_for("01JD5V6Q9ZK3")), "02:fc:bd:c7:c5:44");
        let macs: BTreeSet<_> = (0..10_000).map(|i| mac_for(&format!("vm-{i}"))).collect();
        assert_eq!(macs.len(), 10_000, "distinct ids give distinct MACs");
        assert!(macs.iter().all(|m| m[0] == 0x02));
    }

    #[test]
    fn formats_mac() {
        assert_eq!(format_mac([0x02, 0, 0xab, 0x10, 0xff, 0x7]), "02:00:ab:10:ff:07");
    }

    #[test]
    fn tap_names_fit_ifnamsiz() {
        assert_eq!(tap_name(3), "bgtap3");
        assert_eq!(tap_name(u32::MAX).len(), MAX_IFNAME_LEN);
        assert_eq!(pool_tap_name(0), "bgpool0");
        assert!(pool_tap_name(u16::MAX).len() <= MAX_IFNAME_LEN);
        assert!(IfName::new(tap_name(u32::MAX)).is_ok() && IfName::new(pool_tap_name(u16::MAX)).is_ok());
        assert_eq!(pool_tap_index("bgpool12"), Some(12));
        for name in ["bgpool", "bgpool01", "bgpool1x", "bgtap1", "bgpool70000"] {
            assert_eq!(pool_tap_index(name), None, "{name}");
        }
        assert!(is_banger_tap("bgtap0") && is_banger_tap("bgpool9"));
        assert!(!is_banger_tap("bgtap") && !is_banger_tap("banger0") && !is_banger_tap("bgtapx"));
    }

    #[test]
    fn interface_names_are_checked() {
        assert_eq!(IfName::default().as_str(), DEFAULT_BRIDGE);
        assert!(IfName::new("eth0").is_ok() && IfName::new("br-lan.10").is_ok());
        for bad in ["", ".", "..", "a\"b", "has space", "a/b", "sixteen-chars-xx"] {
            let err = IfName::new(bad).expect_err(bad);
            assert!(matches!(err, NetError::InvalidIfName { .. }), "{bad}");
        }
    }
}
