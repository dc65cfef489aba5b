//! tollgate kernel programs, attached by `agent/src/intercept` to a cgroup v2
//! directory.
//!
//! Owns: redirecting TCP connects to provider addresses to the agent's
//! loopback listener, remembering who dialed what and when (by socket
//! cookie: the agent finds the client socket's cookie from the accepted
//! connection's four-tuple through sock_diag, and deletes the entry when
//! the connection ends; the time lets attribution tell a reused pid from
//! the caller), answering `getpeername()` with the dialed address, and refusing
//! UDP to provider addresses (connected or sent to with `sendto`/`sendmsg`:
//! QUIC falls back to TCP).
//!
//! Must never: block or slow a connect or a UDP send that is not to a
//! provider address (one `CONFIG` and one `PROVIDER_TARGETS` lookup is all
//! it costs), run on other socket events (no sock_ops or sock_release
//! program: the kernel would call them for every TCP socket in the cgroup),
//! or grow a map without bound (origins live in an LRU map).
//!
//! Every entry point is a thin wrapper around `try_x(ctx)`; an `Err` maps to
//! the safe verdict (allow the connect, untouched).
#![no_std]
#![no_main]

use agent_common::{
    AddrPort, Config, MAX_ORIGINS, MAX_TARGETS, Origin, config_flags, stat, target_flags,
};
use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_ANY, bpf_sock_addr},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_uid_gid, bpf_get_netns_cookie, bpf_get_socket_cookie,
        bpf_ktime_get_boot_ns,
    },
    macros::{cgroup_sock_addr, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::SockAddrContext,
};
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;

/// cgroup_sock_addr verdicts.
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;

/// Provider (address, port) pairs to redirect; value: `target_flags`.
#[map]
static PROVIDER_TARGETS: HashMap<AddrPort, u32> = HashMap::with_max_entries(MAX_TARGETS, 0);

/// Agent settings, one entry, filled by user space before attaching.
#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// Origin of each redirected socket, by socket cookie. The agent reads it
/// at accept and deletes it when the connection ends; the LRU bounds it.
#[map]
static ORIGIN_BY_COOKIE: LruHashMap<u64, Origin> = LruHashMap::with_max_entries(MAX_ORIGINS, 0);

/// Per-CPU counters, indexed by `stat::*`.
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

#[inline(always)]
fn count(index: u32) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, programs do not preempt each other on one CPU.
        unsafe { *counter += 1 };
    }
}

// Context fields are read and written one 4-byte word at a time through
// volatile accesses, so LLVM cannot merge them into wider accesses the
// verifier refuses.

#[inline(always)]
fn rd(field: *const u32) -> u32 {
    // SAFETY: `field` points into the context the kernel handed us.
    unsafe { read_volatile(field) }
}

#[inline(always)]
fn wr(field: *mut u32, value: u32) {
    // SAFETY: as above; the fields written are writable in these hooks.
    unsafe { write_volatile(field, value) }
}

/// 16 address bytes (network order) from four context words.
#[inline(always)]
fn words_to_addr(w: [u32; 4]) -> [u8; 16] {
    let [a, b, c, d] = [
        w[0].to_ne_bytes(),
        w[1].to_ne_bytes(),
        w[2].to_ne_bytes(),
        w[3].to_ne_bytes(),
    ];
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

/// Four context words from 16 address bytes (network order).
#[inline(always)]
fn addr_to_words(a: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

#[inline(always)]
fn is_v4_mapped_words(w: &[u32; 4]) -> bool {
    w[0] == 0 && w[1] == 0 && w[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff])
}

/// `user_port` holds the port in network order in its low 16 bits.
#[inline(always)]
fn port_from_user(user_port: u32) -> u16 {
    u16::from_be(user_port as u16)
}

#[inline(always)]
fn port_to_user(port: u16) -> u32 {
    u32::from(port.to_be())
}

#[inline(always)]
fn config() -> Option<&'static Config> {
    CONFIG.get(0)
}

// ---- connect4 / connect6 -------------------------------------------------

#[cgroup_sock_addr(connect4)]
pub fn tollgate_connect4(ctx: SockAddrContext) -> i32 {
    try_connect(&ctx, false).unwrap_or(ALLOW)
}

#[cgroup_sock_addr(connect6)]
pub fn tollgate_connect6(ctx: SockAddrContext) -> i32 {
    try_connect(&ctx, true).unwrap_or(ALLOW)
}

/// The destination a `bpf_sock_addr` context names, as an IPv6 (or
/// v4-mapped) address and port, with the words it was read from.
#[inline(always)]
fn destination(sa: *mut bpf_sock_addr, v6: bool) -> (AddrPort, [u32; 4]) {
    // SAFETY (all raw field projections below): `sa` is the kernel's context.
    let port = port_from_user(rd(unsafe { addr_of!((*sa).user_port) }));
    let dst_words = if v6 {
        let ip6 = unsafe { addr_of!((*sa).user_ip6) }.cast::<u32>();
        [
            rd(ip6),
            rd(ip6.wrapping_add(1)),
            rd(ip6.wrapping_add(2)),
            rd(ip6.wrapping_add(3)),
        ]
    } else {
        let ip4 = rd(unsafe { addr_of!((*sa).user_ip4) });
        [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), ip4]
    };
    (AddrPort::v6(words_to_addr(dst_words), port), dst_words)
}

/// Whether `dst` is a provider address the agent intercepts. The only
/// cost every other connect or send pays.
#[inline(always)]
fn intercepted(cfg: &Config, dst: &AddrPort) -> bool {
    if cfg.flags & config_flags::ENABLED == 0 {
        return false;
    }
    // SAFETY: the value is copied out at once.
    let flags = unsafe { PROVIDER_TARGETS.get(dst) }.copied().unwrap_or(0);
    flags & target_flags::REDIRECT != 0
}

#[cgroup_sock_addr(sendmsg4)]
pub fn tollgate_sendmsg4(ctx: SockAddrContext) -> i32 {
    try_sendmsg(&ctx, false).unwrap_or(ALLOW)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn tollgate_sendmsg6(ctx: SockAddrContext) -> i32 {
    try_sendmsg(&ctx, true).unwrap_or(ALLOW)
}

/// A UDP datagram sent with an address (`sendto`/`sendmsg` on an
/// unconnected socket; a connected one was seen by connect4/6): refused
/// when it is for a provider address, as a UDP connect is.
#[inline(always)]
fn try_sendmsg(ctx: &SockAddrContext, v6: bool) -> Result<i32, i64> {
    let Some(cfg) = config() else {
        return Ok(ALLOW);
    };
    let (dst, _) = destination(ctx.sock_addr, v6);
    if !intercepted(cfg, &dst) {
        return Ok(ALLOW);
    }
    count(stat::UDP_REFUSED);
    Ok(REFUSE)
}

#[inline(always)]
fn try_connect(ctx: &SockAddrContext, v6: bool) -> Result<i32, i64> {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    let Some(cfg) = config() else {
        return Ok(ALLOW);
    };
    let (dst, dst_words) = destination(sa, v6);
    let port = dst.port;
    if !intercepted(cfg, &dst) {
        return Ok(ALLOW);
    }

    // SAFETY (all raw field projections below): `sa` is the kernel's context.
    let protocol = rd(unsafe { addr_of!((*sa).protocol) });
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if protocol == IPPROTO_UDP {
        // The agent's own UDP connects are glibc ranking the addresses of
        // its lookups: they send nothing, and are not a job's QUIC.
        if tgid == cfg.agent_tgid {
            return Ok(ALLOW);
        }
        count(stat::UDP_REFUSED);
        return Ok(REFUSE);
    }
    let sock_type = rd(unsafe { addr_of!((*sa).type_) });
    if protocol != IPPROTO_TCP || sock_type != SOCK_STREAM {
        return Ok(ALLOW);
    }

    if tgid == cfg.agent_tgid {
        count(stat::AGENT_SELF);
        return Ok(ALLOW);
    }
    // SAFETY: helper call with the program's own context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if netns != cfg.netns_cookie {
        count(stat::OTHER_NETNS);
        return Ok(ALLOW);
    }

    let uid_gid = bpf_get_current_uid_gid();
    let origin = Origin {
        // SAFETY: helper calls valid in cgroup_sock_addr programs.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        tgid,
        pid: pid_tgid as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        dst_addr: dst.addr,
        dst_port: port,
        family: if v6 { AF_INET6 as u16 } else { AF_INET as u16 },
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        flags: 0,
        // SAFETY: helper valid in every program type.
        connected_boot_ns: unsafe { bpf_ktime_get_boot_ns() },
    };
    if ORIGIN_BY_COOKIE
        .insert(origin.cookie, origin, u64::from(BPF_ANY))
        .is_err()
    {
        count(stat::MAP_ERRORS);
        return Ok(ALLOW);
    }

    let listen_port = port_to_user(cfg.listen_port);
    if v6 {
        let listen = if is_v4_mapped_words(&dst_words) {
            let [a, b, c, d] = cfg.listen_addr4;
            AddrPort::v4([a, b, c, d], 0).addr
        } else {
            cfg.listen_addr6
        };
        let w = addr_to_words(&listen);
        let ip6 = unsafe { addr_of_mut!((*sa).user_ip6) }.cast::<u32>();
        wr(ip6, w[0]);
        wr(ip6.wrapping_add(1), w[1]);
        wr(ip6.wrapping_add(2), w[2]);
        wr(ip6.wrapping_add(3), w[3]);
    } else {
        wr(
            unsafe { addr_of_mut!((*sa).user_ip4) },
            u32::from_ne_bytes(cfg.listen_addr4),
        );
    }
    wr(unsafe { addr_of_mut!((*sa).user_port) }, listen_port);
    count(stat::REDIRECTED);
    Ok(ALLOW)
}

// ---- getpeername4 / getpeername6 ------------------------------------------

#[cgroup_sock_addr(getpeername4)]
pub fn tollgate_getpeername4(ctx: SockAddrContext) -> i32 {
    // getpeername hooks must return 1.
    try_getpeername(&ctx, false).unwrap_or(ALLOW)
}

#[cgroup_sock_addr(getpeername6)]
pub fn tollgate_getpeername6(ctx: SockAddrContext) -> i32 {
    try_getpeername(&ctx, true).unwrap_or(ALLOW)
}

#[inline(always)]
fn try_getpeername(ctx: &SockAddrContext, v6: bool) -> Result<i32, i64> {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: helper valid in cgroup_sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once.
    let Some(origin) = (unsafe { ORIGIN_BY_COOKIE.get(cookie) }).copied() else {
        return Ok(ALLOW);
    };
    let w = addr_to_words(&origin.dst_addr);
    // SAFETY (field projections): `sa` is the kernel's context.
    if v6 {
        let ip6 = unsafe { addr_of_mut!((*sa).user_ip6) }.cast::<u32>();
        wr(ip6, w[0]);
        wr(ip6.wrapping_add(1), w[1]);
        wr(ip6.wrapping_add(2), w[2]);
        wr(ip6.wrapping_add(3), w[3]);
    } else {
        wr(unsafe { addr_of_mut!((*sa).user_ip4) }, w[3]);
    }
    wr(
        unsafe { addr_of_mut!((*sa).user_port) },
        port_to_user(origin.dst_port),
    );
    count(stat::PEERNAME_RESTORED);
    Ok(ALLOW)
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 11] = *b"Apache-2.0\0";

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
