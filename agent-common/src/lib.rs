//! Map keys and values shared by the kernel programs (`agent-ebpf`) and the
//! agent (`agent/src/intercept`).
//!
//! Owns: the byte layout of every map entry. Must never: contain logic beyond
//! trivial constructors, use `bool` or implicit padding (the kernel side reads
//! raw bytes; every padding field is spelled out and tested by size).
//!
//! Addresses are 16 bytes in network order; IPv4 addresses are stored
//! v4-mapped (`::ffff:a.b.c.d`), so one key type serves both families and an
//! IPv4 key can never collide with an IPv6 one. Ports are in host order.
#![no_std]

/// Maximum number of provider (address, port) pairs the agent can redirect.
pub const MAX_TARGETS: u32 = 16_384;
/// Maximum number of in-flight redirected connections whose origin is kept
/// (LRU: the oldest entry is evicted first, so a job cannot grow it).
pub const MAX_ORIGINS: u32 = 65_536;

/// An address and port as a socket sees it. Key of `PROVIDER_TARGETS` (the
/// destination a client dials).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AddrPort {
    /// IPv6 address, or v4-mapped IPv4 address, in network byte order.
    pub addr: [u8; 16],
    /// Port in host byte order.
    pub port: u16,
    pub _pad: u16,
}

impl AddrPort {
    pub const fn v4(octets: [u8; 4], port: u16) -> Self {
        let [a, b, c, d] = octets;
        AddrPort {
            addr: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a, b, c, d],
            port,
            _pad: 0,
        }
    }

    pub const fn v6(addr: [u8; 16], port: u16) -> Self {
        AddrPort {
            addr,
            port,
            _pad: 0,
        }
    }

    /// True when `addr` is a v4-mapped IPv4 address.
    pub fn is_v4_mapped(&self) -> bool {
        self.addr[..10].iter().all(|b| *b == 0) && self.addr[10] == 0xff && self.addr[11] == 0xff
    }
}

/// Value flags of `PROVIDER_TARGETS`.
pub mod target_flags {
    /// TCP connects to this address are redirected to the agent.
    pub const REDIRECT: u32 = 1;
}

/// What the connect hook learned about the process that dialed a provider.
/// Value of `ORIGIN_BY_COOKIE` (by the client socket's cookie).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Origin {
    /// Socket cookie of the client's socket.
    pub cookie: u64,
    /// cgroup v2 id of the caller (the inode number of its cgroup directory).
    pub cgroup_id: u64,
    /// Process id (thread group id) of the caller.
    pub tgid: u32,
    /// Thread id of the caller.
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    /// The address the client dialed (network order, v4-mapped for IPv4).
    pub dst_addr: [u8; 16],
    /// The port the client dialed (host order).
    pub dst_port: u16,
    /// Address family of the client's socket (`AF_INET` = 2, `AF_INET6` = 10).
    pub family: u16,
    /// `comm` of the calling thread, NUL padded.
    pub comm: [u8; 16],
    pub flags: u32,
    /// When the connect was made, in nanoseconds since boot
    /// (`bpf_ktime_get_boot_ns`, the clock of a process's start time in
    /// `/proc/PID/stat`): a process that started later has a reused pid.
    pub connected_boot_ns: u64,
}

/// Agent settings the programs read, in `CONFIG[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Config {
    /// Network namespace cookie of the agent; connects from other namespaces
    /// are left alone (a rewrite to loopback would land in the container).
    pub netns_cookie: u64,
    /// IPv6 listener address (network order), normally `::1`.
    pub listen_addr6: [u8; 16],
    /// IPv4 listener address (network order), normally `127.0.0.1`.
    pub listen_addr4: [u8; 4],
    /// The agent's own process id: its connections are never redirected.
    pub agent_tgid: u32,
    /// Listener port, host order.
    pub listen_port: u16,
    pub _pad: u16,
    /// `config_flags::*`.
    pub flags: u32,
}

pub mod config_flags {
    /// Redirection is on. With the flag clear every connect is allowed untouched.
    pub const ENABLED: u32 = 1;
}

/// Indices of the per-CPU `STATS` counters.
pub mod stat {
    /// Connects rewritten to the agent.
    pub const REDIRECTED: u32 = 0;
    /// Provider connects from another network namespace, left untouched.
    pub const OTHER_NETNS: u32 = 1;
    /// The agent's own connects to providers, left untouched.
    pub const AGENT_SELF: u32 = 2;
    /// UDP to provider addresses refused, connected or sent to (QUIC falls
    /// back to TCP).
    pub const UDP_REFUSED: u32 = 3;
    /// Map updates that failed (the connect was allowed untouched).
    pub const MAP_ERRORS: u32 = 4;
    /// getpeername calls answered with the dialed address.
    pub const PEERNAME_RESTORED: u32 = 5;
    pub const COUNT: u32 = 6;
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` data with explicit padding and no pointers.
    unsafe impl aya::Pod for super::AddrPort {}
    unsafe impl aya::Pod for super::Origin {}
    unsafe impl aya::Pod for super::Config {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_are_stable() {
        assert_eq!(size_of::<AddrPort>(), 20);
        assert_eq!(size_of::<Origin>(), 80);
        assert_eq!(size_of::<Config>(), 40);
        assert_eq!(size_of::<Origin>() % 8, 0);
        assert_eq!(size_of::<Config>() % 8, 0);
    }

    #[test]
    fn v4_mapped() {
        let a = AddrPort::v4([127, 0, 0, 1], 443);
        assert!(a.is_v4_mapped());
        assert!(!AddrPort::v6([0; 16], 443).is_v4_mapped());
    }
}
