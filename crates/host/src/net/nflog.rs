//! The kernel's copies of refused guest packets (`log group N` in `eg_refuse`), read from an
//! NFLOG netlink socket: for the daemon's denial log. Each copy is cut to [`COPY_RANGE`] bytes by
//! the kernel (IPv4 and transport headers are all we read), the socket's receive buffer is the
//! kernel's (a flood overflows it: copies are lost, counted by `ENOBUFS`, never queued here), and
//! one datagram is read into a fixed buffer at a time.
//!
//! Protocol (nfnetlink_log): a `NFULNL_MSG_CONFIG` request binds the group and asks for packet
//! copies; each copy arrives as `NFULNL_MSG_PACKET` with attributes, of which we read
//! `NFULA_PREFIX` (must be ours) and `NFULA_PAYLOAD` (the IPv4 packet).

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd as _, AsRawFd as _, OwnedFd};

use nix::sys::socket::{self, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType};
use tokio::io::unix::AsyncFd;

/// Bytes of each packet the kernel copies: an IPv4 header with options and the ports.
pub const COPY_RANGE: u32 = 80;

const NFNL_SUBSYS_ULOG: u16 = 4;
const NFULNL_MSG_PACKET: u16 = 0;
const NFULNL_MSG_CONFIG: u16 = 1;
const NFULA_CFG_CMD: u16 = 1;
const NFULA_CFG_MODE: u16 = 2;
const NFULNL_CFG_CMD_BIND: u8 = 1;
const NFULNL_COPY_PACKET: u8 = 2;
const NFULA_PAYLOAD: u16 = 9;
const NFULA_PREFIX: u16 = 10;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_HDRLEN: usize = 16;

/// One refused packet as the kernel copied it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// Its source (the guest).
    pub src: Ipv4Addr,
    /// Its destination.
    pub dst: Ipv4Addr,
    /// IP protocol number (6 TCP, 17 UDP, 1 ICMP).
    pub protocol: u8,
    /// Destination port for TCP and UDP.
    pub port: Option<u16>,
}

/// A bound NFLOG socket. See the module doc.
pub struct NflogSocket {
    fd: AsyncFd<OwnedFd>,
    prefix: Vec<u8>,
}

fn attr(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    out.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(out.len().next_multiple_of(4), 0);
}

fn config_message(group: u16, attrs: &[u8], seq: u32) -> Vec<u8> {
    let mut msg = Vec::with_capacity(64);
    let len = NLMSG_HDRLEN + 4 + attrs.len();
    msg.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_ne_bytes());
    msg.extend_from_slice(&((NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG).to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: family AF_UNSPEC, version 0, res_id = group (big-endian).
    msg.extend_from_slice(&[0, 0]);
    msg.extend_from_slice(&group.to_be_bytes());
    msg.extend_from_slice(attrs);
    msg
}

impl NflogSocket {
    /// Binds NFLOG group `group`, keeping copies whose prefix starts with `prefix`.
    pub fn bind(group: u16, prefix: &str) -> io::Result<Self> {
        let fd = socket::socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkNetFilter,
        )?;
        socket::bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
        let mut bind = Vec::new();
        attr(&mut bind, NFULA_CFG_CMD, &[NFULNL_CFG_CMD_BIND]);
        let mut mode = Vec::new();
        let mut mode_payload = COPY_RANGE.to_be_bytes().to_vec();
        mode_payload.extend_from_slice(&[NFULNL_COPY_PACKET, 0]);
        attr(&mut mode, NFULA_CFG_MODE, &mode_payload);
        for (seq, attrs) in [(1, bind), (2, mode)] {
            socket::send(fd.as_raw_fd(), &config_message(group, &attrs, seq), MsgFlags::empty())?;
            Self::wait_ack(&fd)?;
        }
        // SAFETY: `fd` is an open socket we own; the AsyncFd owns it from here on and its raw fd
        // stays the same until the AsyncFd is dropped.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)?;
        Ok(Self { fd, prefix: prefix.as_bytes().to_vec() })
    }

    /// Reads the kernel's answer to a config request (the socket is non-blocking: poll first).
    fn wait_ack(fd: &OwnedFd) -> io::Result<()> {
        let mut fds = [nix::poll::PollFd::new(fd.as_fd(), nix::poll::PollFlags::POLLIN)];
        nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(2000u16))?;
        let mut buf = [0u8; 512];
        let n = socket::recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        // NLMSG_ERROR (2) with error 0 is the ack; a negative errno is a refusal.
        if n >= NLMSG_HDRLEN + 4 && u16::from_ne_bytes([buf[4], buf[5]]) == 2 {
            let errno = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
            if errno != 0 {
                return Err(io::Error::from_raw_os_error(-errno));
            }
        }
        Ok(())
    }

    /// The next batch of refused packets (one datagram; may be empty). A receive buffer
    /// overflow (`ENOBUFS`) is reported as an empty batch: those copies are lost.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<Vec<Refused>> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| socket::recv(fd.as_raw_fd(), buf, MsgFlags::empty()).map_err(io::Error::from)) {
                Ok(Ok(n)) => return Ok(parse_datagram(&buf[..n], &self.prefix)),
                Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOBUFS) => return Ok(Vec::new()),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

/// The refused packets in one netlink datagram whose prefix starts with `prefix`; anything
/// malformed is skipped (the bytes are the kernel's, but the packet inside is the guest's).
pub fn parse_datagram(mut data: &[u8], prefix: &[u8]) -> Vec<Refused> {
    let mut out = Vec::new();
    while data.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
        if len < NLMSG_HDRLEN || len > data.len() {
            break;
        }
        let kind = u16::from_ne_bytes([data[4], data[5]]);
        if kind == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET && len >= NLMSG_HDRLEN + 4 {
            if let Some(r) = parse_packet(&data[NLMSG_HDRLEN + 4..len], prefix) {
                out.push(r);
            }
        }
        data = &data[len.next_multiple_of(4).min(data.len())..];
    }
    out
}

fn parse_packet(mut attrs: &[u8], prefix: &[u8]) -> Option<Refused> {
    let (mut ours, mut payload) = (false, None);
    while attrs.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
        if len < 4 || len > attrs.len() {
            break;
        }
        let value = &attrs[4..len];
        match kind {
            NFULA_PREFIX => ours = value.starts_with(prefix),
            NFULA_PAYLOAD => payload = Some(value),
            _ => {}
        }
        attrs = &attrs[len.next_multiple_of(4).min(attrs.len())..];
    }
    let ip = payload.filter(|_| ours)?;
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let protocol = ip[9];
    let port = match protocol {
        6 | 17 if ip.len() >= ihl + 4 => Some(u16::from_be_bytes([ip[ihl + 2], ip[ihl + 3]])),
        _ => None,
    };
    Some(Refused {
        src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        protocol,
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(prefix: &str, ip: &[u8]) -> Vec<u8> {
        let mut attrs = Vec::new();
        attr(&mut attrs, 1, &[0, 0x08, 0, 0]);
        attr(&mut attrs, NFULA_PREFIX, format!("{prefix}\0").as_bytes());
        attr(&mut attrs, NFULA_PAYLOAD, ip);
        let mut msg = Vec::new();
        let len = NLMSG_HDRLEN + 4 + attrs.len();
        msg.extend_from_slice(&u32::try_from(len).expect("len").to_ne_bytes());
        msg.extend_from_slice(&(NFNL_SUBSYS_ULOG << 8).to_ne_bytes());
        msg.extend_from_slice(&[0; 10]);
        msg.extend_from_slice(&[2, 0, 0, 7]);
        msg.extend_from_slice(&attrs);
        msg
    }

    fn tcp_syn() -> Vec<u8> {
        let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0, 172, 30, 0, 2, 198, 18, 0, 20];
        ip.extend_from_slice(&[0xc0, 0x00, 0, 80]);
        ip
    }

    #[test]
    fn copies_are_parsed_and_foreign_or_short_ones_skipped() {
        let mut datagram = packet("bgeg ", &tcp_syn());
        datagram.extend(packet("other ", &tcp_syn()));
        datagram.extend(packet("bgeg ", &tcp_syn()[..10]));
        datagram.extend(packet("bgeg ", &[0x45, 0, 0, 20, 0, 0, 0, 0, 64, 1, 0, 0, 172, 30, 0, 2, 169, 254, 169, 254]));
        let got = parse_datagram(&datagram, b"bgeg");
        assert_eq!(
            got,
            [
                Refused {
                    src: Ipv4Addr::new(172, 30, 0, 2),
                    dst: Ipv4Addr::new(198, 18, 0, 20),
                    protocol: 6,
                    port: Some(80)
                },
                Refused {
                    src: Ipv4Addr::new(172, 30, 0, 2),
                    dst: Ipv4Addr::new(169, 254, 169, 254),
                    protocol: 1,
                    port: None
                },
            ]
        );
        // Truncated or lying lengths end the parse without a panic.
        let mut bad = packet("bgeg ", &tcp_syn());
        bad[0] = 0xff;
        assert!(parse_datagram(&bad, b"bgeg").is_empty());
        assert!(parse_datagram(&[1, 2, 3], b"bgeg").is_empty());
    }
}
