//! `ports`: listening sockets from `/proc/net/{tcp,tcp6,udp,udp6}` — TCP in LISTEN, UDP bound
//! and unconnected (state 07, `TCP_CLOSE`).

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

use banger_proto::agent::ListeningPort;

const TCP_LISTEN: &str = "0A";
const UDP_UNCONNECTED: &str = "07";

/// Listening sockets under `proc_net` (normally `/proc/net`), sorted, without duplicates.
pub fn listening(proc_net: &Path) -> Vec<ListeningPort> {
    let mut ports = Vec::new();
    for proto in ["tcp", "tcp6", "udp", "udp6"] {
        if let Ok(text) = std::fs::read_to_string(proc_net.join(proto)) {
            ports.extend(parse_table(proto, &text));
        }
    }
    ports.sort_by(|a, b| (a.port, &a.proto, &a.address).cmp(&(b.port, &b.proto, &b.address)));
    ports.dedup();
    ports
}

/// Parses one `/proc/net` socket table.
pub fn parse_table(proto: &str, text: &str) -> Vec<ListeningPort> {
    let wanted = if proto.starts_with("tcp") { TCP_LISTEN } else { UDP_UNCONNECTED };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (local, state) = (fields.get(1)?, fields.get(3)?);
            if *state != wanted {
                return None;
            }
            let (addr, port) = local.split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok().filter(|p| *p != 0)?;
            Some(ListeningPort { proto: proto.to_owned(), address: parse_address(addr)?, port })
        })
        .collect()
}

/// The kernel prints each 32-bit word of the address as a host-order number.
fn parse_address(hex: &str) -> Option<String> {
    let word = |i: usize| hex.get(i * 8..i * 8 + 8).and_then(|w| u32::from_str_radix(w, 16).ok()).map(u32::to_ne_bytes);
    match hex.len() {
        8 => Some(Ipv4Addr::from(word(0)?).to_string()),
        32 => {
            let mut octets = [0u8; 16];
            for i in 0..4 {
                octets[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            Some(Ipv6Addr::from(octets).to_string())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0
   2: 0F02000A:0016 0202000A:C350 01 00000000:00000000 02:00000A3B 00000000     0        0 3 4 0 20 4 30 10 -1
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st
   0: 00000000000000000000000000000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4 1 0 100 0 0 10 0
   1: 00000000000000000000000001000000:0277 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5 1 0 100 0 0 10 0
";
    const UDP: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  10: 3500007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000   101        0 6 2 0 0
  11: 0F02000A:D431 08080808:0035 01 00000000:00000000 00:00000000 00000000     0        0 7 2 0 0
";

    fn port(proto: &str, address: &str, port: u16) -> ListeningPort {
        ListeningPort { proto: proto.into(), address: address.into(), port }
    }

    #[test]
    fn tables_parse_to_listening_sockets() {
        assert_eq!(parse_table("tcp", TCP), [port("tcp", "0.0.0.0", 22), port("tcp", "127.0.0.1", 8080)]);
        assert_eq!(parse_table("tcp6", TCP6), [port("tcp6", "::", 22), port("tcp6", "::1", 631)]);
        assert_eq!(parse_table("udp", UDP), [port("udp", "127.0.0.53", 53)]);
    }

    #[test]
    fn listening_reads_all_four_tables() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, text) in [("tcp", TCP), ("tcp6", TCP6), ("udp", UDP)] {
            std::fs::write(dir.path().join(name), text).expect("write");
        }
        let found = listening(dir.path());
        assert_eq!(found.len(), 5);
        assert_eq!(found[0], port("tcp", "0.0.0.0", 22));
        assert_eq!(found[1], port("tcp6", "::", 22));
    }
}
