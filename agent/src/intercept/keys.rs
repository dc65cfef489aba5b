//! Conversions between `std::net` addresses and the map types of
//! `agent-common` (16-byte network-order addresses, v4-mapped for IPv4,
//! host-order ports). Pure functions only.

use std::net::{Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use agent_common::{AddrPort, Origin};

use super::ConnOrigin;

/// The map key for `addr`. IPv4 and v4-mapped IPv6 give the same key, so a
/// client seen as `127.0.0.1:5000` or `[::ffff:127.0.0.1]:5000` is one entry.
pub(crate) fn key_of(addr: SocketAddr) -> AddrPort {
    match addr {
        SocketAddr::V4(a) => AddrPort::v4(a.ip().octets(), a.port()),
        SocketAddr::V6(a) => AddrPort::v6(a.ip().octets(), a.port()),
    }
}

/// The address a map entry names: IPv4 for v4-mapped addresses.
pub(crate) fn addr_of(addr: [u8; 16], port: u16) -> SocketAddr {
    let v6 = Ipv6Addr::from(addr);
    match v6.to_ipv4_mapped() {
        Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, port)),
        None => SocketAddr::V6(SocketAddrV6::new(v6, port, 0, 0)),
    }
}

/// `comm` up to its first NUL.
pub(crate) fn comm_of(comm: &[u8; 16]) -> String {
    let len = comm.iter().position(|b| *b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..len]).into_owned()
}

impl From<&Origin> for ConnOrigin {
    fn from(o: &Origin) -> Self {
        ConnOrigin {
            tgid: o.tgid,
            pid: o.pid,
            uid: o.uid,
            gid: o.gid,
            cgroup_id: o.cgroup_id,
            comm: comm_of(&o.comm),
            dst: addr_of(o.dst_addr, o.dst_port),
            cookie: o.cookie,
            connected_boot_ns: o.connected_boot_ns,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_and_v4_mapped_give_one_key() {
        let v4: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:5000".parse().unwrap();
        assert_eq!(key_of(v4), key_of(mapped));
        let k = key_of(v4);
        assert!(k.is_v4_mapped());
        assert_eq!(
            &k.addr[12..],
            &[127, 0, 0, 1],
            "address bytes are in network order"
        );
        assert_eq!(k.port, 5000, "port is in host order");
        assert_eq!(k._pad, 0);
    }

    #[test]
    fn v6_key_keeps_bytes() {
        let a: SocketAddr = "[2001:db8::5]:443".parse().unwrap();
        let k = key_of(a);
        assert!(!k.is_v4_mapped());
        assert_eq!(k.addr[0..2], [0x20, 0x01]);
        assert_eq!(k.addr[15], 5);
        assert_eq!(addr_of(k.addr, k.port), a);
    }

    #[test]
    fn mapped_round_trips_to_v4() {
        let a: SocketAddr = "162.159.140.245:443".parse().unwrap();
        let k = key_of(a);
        assert_eq!(addr_of(k.addr, k.port), a);
        let mapped: SocketAddr = "[::ffff:162.159.140.245]:443".parse().unwrap();
        assert_eq!(
            addr_of(key_of(mapped).addr, 443),
            a,
            "v4-mapped comes back as V4"
        );
    }

    #[test]
    fn loopback_v6_is_not_mapped() {
        let a: SocketAddr = "[::1]:443".parse().unwrap();
        assert_eq!(addr_of(key_of(a).addr, 443), a);
    }

    #[test]
    fn comm_stops_at_nul() {
        let mut c = [0u8; 16];
        c[..7].copy_from_slice(b"python3");
        assert_eq!(comm_of(&c), "python3");
        assert_eq!(comm_of(&[b'x'; 16]), "x".repeat(16));
    }

    #[test]
    fn origin_converts() {
        let o = Origin {
            cookie: 7,
            cgroup_id: 9,
            tgid: 100,
            pid: 101,
            uid: 1000,
            gid: 1001,
            dst_addr: AddrPort::v4([10, 0, 0, 5], 0).addr,
            dst_port: 443,
            family: 2,
            comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
            flags: 0,
            connected_boot_ns: 12_345,
        };
        let c = ConnOrigin::from(&o);
        assert_eq!(
            (c.tgid, c.pid, c.uid, c.gid, c.cgroup_id, c.cookie),
            (100, 101, 1000, 1001, 9, 7)
        );
        assert_eq!(c.comm, "curl");
        assert_eq!(c.connected_boot_ns, 12_345);
        assert_eq!(c.dst, "10.0.0.5:443".parse::<SocketAddr>().unwrap());
    }
}
