//! The socket cookie of the client end of an accepted loopback connection,
//! from the kernel's socket diagnostics (NETLINK_SOCK_DIAG, the interface
//! `ss` uses): one exact lookup by the connection's four-tuple.
//!
//! The connect hook files each redirected socket's origin under its cookie;
//! the agent, holding the accepted end, knows the client's address and port
//! (its peer) and the listener's (its local address), which name the
//! client's socket exactly. This replaces a sock_ops program that re-keyed
//! each origin by local port, at a cost every TCP socket in the cgroup paid.
//!
//! Owns: one netlink socket per thread and the byte layout of
//! `inet_diag_req_v2` / `inet_diag_msg` (linux/inet_diag.h). Must never:
//! block (the kernel answers inside `sendto`, so the reply is read with
//! `MSG_DONTWAIT`), or look at any socket but the one named.

use std::{
    cell::RefCell,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd as _, OwnedFd},
};

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, sendto, socket,
};

/// `SOCK_DIAG_BY_FAMILY` (linux/sock_diag.h).
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_HDRLEN: usize = 16;
/// `struct inet_diag_req_v2`.
const REQ_LEN: usize = 56;
/// `struct inet_diag_msg`.
const MSG_LEN: usize = 72;
/// Offset of `idiag_cookie` in `inet_diag_msg` (4 header bytes, then the
/// socket id: ports 4, addresses 32, interface 4).
const MSG_COOKIE: usize = 4 + 4 + 32 + 4;
const IPPROTO_TCP: u8 = 6;

/// The request message for the TCP socket whose local end is `local` and
/// remote end is `remote`. IPv4 and v4-mapped addresses are asked as
/// AF_INET: the kernel finds a dual-stack socket connected over IPv4 that
/// way too.
pub(crate) fn request(local: SocketAddr, remote: SocketAddr, seq: u32) -> Vec<u8> {
    let (family, src) = addr_words(local.ip());
    let (_, dst) = addr_words(remote.ip());
    let total = NLMSG_HDRLEN + REQ_LEN;
    let mut m = Vec::with_capacity(total);
    // nlmsghdr
    m.extend_from_slice(&u32::try_from(total).unwrap_or(u32::MAX).to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes()); // the kernel fills in our port id
    // inet_diag_req_v2: family, protocol, ext, pad, states (all)
    m.extend_from_slice(&[family, IPPROTO_TCP, 0, 0]);
    m.extend_from_slice(&u32::MAX.to_ne_bytes());
    // inet_diag_sockid: ports (network order), src, dst, interface, cookie
    m.extend_from_slice(&local.port().to_be_bytes());
    m.extend_from_slice(&remote.port().to_be_bytes());
    m.extend_from_slice(&src);
    m.extend_from_slice(&dst);
    m.extend_from_slice(&0u32.to_ne_bytes());
    // INET_DIAG_NOCOOKIE: any socket with this four-tuple.
    m.extend_from_slice(&u32::MAX.to_ne_bytes());
    m.extend_from_slice(&u32::MAX.to_ne_bytes());
    debug_assert_eq!(m.len(), total);
    m
}

/// Address family and the 16 address bytes of `inet_diag_sockid` (an IPv4
/// address fills the first four).
fn addr_words(ip: IpAddr) -> (u8, [u8; 16]) {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    let mut out = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => {
            out[..4].copy_from_slice(&v4.octets());
            (libc::AF_INET as u8, out)
        }
        IpAddr::V6(v6) => {
            out.copy_from_slice(&v6.octets());
            (libc::AF_INET6 as u8, out)
        }
    }
}

/// What a reply said.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Reply {
    /// The socket's cookie.
    Cookie(u64),
    /// No such socket (it is gone already).
    NotFound,
    /// A message for another request (an earlier one that timed out): skip.
    Other,
}

/// Reads the messages in one datagram, answering request `seq`.
pub(crate) fn parse(buf: &[u8], seq: u32) -> io::Result<Reply> {
    let mut rest = buf;
    let mut answer = Reply::Other;
    while rest.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(word(rest, 0)) as usize;
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        let msg_seq = u32::from_ne_bytes(word(rest, 8));
        if len < NLMSG_HDRLEN || len > rest.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "sock_diag reply with a bad length {len} ({} bytes)",
                    rest.len()
                ),
            ));
        }
        let body = &rest[NLMSG_HDRLEN..len];
        if msg_seq == seq && answer == Reply::Other {
            answer = match kind {
                SOCK_DIAG_BY_FAMILY if body.len() >= MSG_LEN => {
                    let lo = u32::from_ne_bytes(word(body, MSG_COOKIE));
                    let hi = u32::from_ne_bytes(word(body, MSG_COOKIE + 4));
                    Reply::Cookie(u64::from(hi) << 32 | u64::from(lo))
                }
                NLMSG_ERROR if body.len() >= 4 => {
                    let errno = -i32::from_ne_bytes(word(body, 0));
                    if errno == libc::ENOENT {
                        Reply::NotFound
                    } else {
                        return Err(io::Error::from_raw_os_error(errno));
                    }
                }
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "unexpected sock_diag reply type {kind} ({} bytes)",
                            body.len()
                        ),
                    ));
                }
            };
        }
        // Messages are padded to 4 bytes.
        let next = len.next_multiple_of(4).min(rest.len());
        rest = &rest[next..];
    }
    Ok(answer)
}

fn word(buf: &[u8], at: usize) -> [u8; 4] {
    [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]
}

struct DiagSocket {
    fd: OwnedFd,
    seq: u32,
}

thread_local! {
    static SOCKET: RefCell<Option<DiagSocket>> = const { RefCell::new(None) };
}

/// The cookie of the TCP socket whose local end is `local` and remote end
/// `remote`, in the caller's network namespace; `Ok(None)` when there is
/// no such socket.
pub(crate) fn socket_cookie(local: SocketAddr, remote: SocketAddr) -> io::Result<Option<u64>> {
    SOCKET.with(|cell| {
        let mut slot = cell.borrow_mut();
        let sock = match slot.as_mut() {
            Some(sock) => sock,
            None => {
                let fd = socket(
                    AddressFamily::Netlink,
                    SockType::Raw,
                    SockFlag::SOCK_CLOEXEC,
                    SockProtocol::NetlinkSockDiag,
                )
                .map_err(io::Error::from)?;
                slot.insert(DiagSocket { fd, seq: 0 })
            }
        };
        let result = ask(sock, local, remote);
        if result.is_err() {
            // A fresh socket next time, with nothing stale queued on it.
            *slot = None;
        }
        result
    })
}

/// Checks, before any program is attached, that the kernel answers: a
/// loopback connection of our own must be found, with its own cookie.
/// Without this every redirected connection would be refused.
/// A loopback connection that cannot be made (`lo` down in a fresh network
/// namespace) is its own error: the diagnostics were never asked.
pub(crate) fn self_test() -> Result<(), super::InterceptError> {
    use super::InterceptError::{NoLoopback, NoSockDiag};
    let loopback = || -> io::Result<_> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let server = listener.local_addr()?;
        let client = std::net::TcpStream::connect(server)?;
        let local = client.local_addr()?;
        let accepted = listener.accept()?;
        Ok((server, local, client, accepted))
    };
    let (server, local, _client, _accepted) = loopback().map_err(NoLoopback)?;
    match socket_cookie(local, server).map_err(NoSockDiag)? {
        Some(_) => Ok(()),
        None => Err(NoSockDiag(io::Error::new(
            io::ErrorKind::NotFound,
            "a live loopback connection was not found",
        ))),
    }
}

fn ask(sock: &mut DiagSocket, local: SocketAddr, remote: SocketAddr) -> io::Result<Option<u64>> {
    sock.seq = sock.seq.wrapping_add(1);
    let seq = sock.seq;
    let req = request(local, remote, seq);
    let kernel = NetlinkAddr::new(0, 0);
    sendto(sock.fd.as_raw_fd(), &req, &kernel, MsgFlags::empty()).map_err(io::Error::from)?;
    let mut buf = [0u8; 4096];
    // The kernel answers inside sendto: the reply is queued already. Stale
    // replies (none are expected) are skipped, a few at most.
    for _ in 0..8 {
        let n = recv(sock.fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT).map_err(|e| {
            if e == nix::errno::Errno::EAGAIN {
                io::Error::new(io::ErrorKind::TimedOut, "no sock_diag reply")
            } else {
                io::Error::from(e)
            }
        })?;
        match parse(&buf[..n], seq)? {
            Reply::Cookie(cookie) => return Ok(Some(cookie)),
            Reply::NotFound => return Ok(None),
            Reply::Other => {}
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "no sock_diag reply to this request",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn request_layout() {
        let local: SocketAddr = "127.0.0.9:40000".parse().unwrap();
        let remote: SocketAddr = "127.0.0.1:15443".parse().unwrap();
        let m = request(local, remote, 7);
        assert_eq!(m.len(), 72);
        assert_eq!(u32::from_ne_bytes(word(&m, 0)), 72);
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), SOCK_DIAG_BY_FAMILY);
        assert_eq!(u32::from_ne_bytes(word(&m, 8)), 7);
        assert_eq!(m[16], libc::AF_INET as u8);
        assert_eq!(m[17], IPPROTO_TCP);
        assert_eq!(&m[24..26], &40000u16.to_be_bytes());
        assert_eq!(&m[26..28], &15443u16.to_be_bytes());
        assert_eq!(&m[28..32], &[127, 0, 0, 9]);
        assert_eq!(&m[44..48], &[127, 0, 0, 1]);
        assert_eq!(&m[64..72], &[0xff; 8], "no cookie");
        // A v4-mapped address is asked as IPv4.
        let mapped: SocketAddr = "[::ffff:127.0.0.9]:40000".parse().unwrap();
        assert_eq!(request(mapped, remote, 7), m);
        let v6 = request(
            "[::1]:40000".parse().unwrap(),
            "[::1]:1".parse().unwrap(),
            1,
        );
        assert_eq!(v6[16], libc::AF_INET6 as u8);
        assert_eq!(v6[43], 1);
    }

    fn header(len: usize, kind: u16, seq: u32) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&u32::try_from(len).unwrap().to_ne_bytes());
        h.extend_from_slice(&kind.to_ne_bytes());
        h.extend_from_slice(&0u16.to_ne_bytes());
        h.extend_from_slice(&seq.to_ne_bytes());
        h.extend_from_slice(&0u32.to_ne_bytes());
        h
    }

    #[test]
    fn replies() {
        let mut msg = header(NLMSG_HDRLEN + MSG_LEN, SOCK_DIAG_BY_FAMILY, 3);
        let mut body = vec![0u8; MSG_LEN];
        body[MSG_COOKIE..MSG_COOKIE + 4].copy_from_slice(&0x0102_0304u32.to_ne_bytes());
        body[MSG_COOKIE + 4..MSG_COOKIE + 8].copy_from_slice(&0x0au32.to_ne_bytes());
        msg.extend_from_slice(&body);
        assert_eq!(parse(&msg, 3).unwrap(), Reply::Cookie(0x0a_0102_0304));
        assert_eq!(parse(&msg, 4).unwrap(), Reply::Other, "another request's");

        let mut err = header(NLMSG_HDRLEN + 20, NLMSG_ERROR, 5);
        err.extend_from_slice(&(-libc::ENOENT).to_ne_bytes());
        err.extend_from_slice(&[0u8; 16]);
        assert_eq!(parse(&err, 5).unwrap(), Reply::NotFound);
        let mut perm = header(NLMSG_HDRLEN + 20, NLMSG_ERROR, 5);
        perm.extend_from_slice(&(-libc::EPERM).to_ne_bytes());
        perm.extend_from_slice(&[0u8; 16]);
        assert_eq!(
            parse(&perm, 5).unwrap_err().raw_os_error(),
            Some(libc::EPERM)
        );

        // A stale reply then ours, in one datagram.
        let mut both = err.clone();
        both[8..12].copy_from_slice(&4u32.to_ne_bytes());
        both.extend_from_slice(&msg);
        assert_eq!(parse(&both, 3).unwrap(), Reply::Cookie(0x0a_0102_0304));

        // Truncated and lying lengths are errors, never a panic.
        assert!(parse(&msg[..40], 3).is_err());
        let mut short = msg.clone();
        short[0..4].copy_from_slice(&8u32.to_ne_bytes());
        assert!(parse(&short, 3).is_err());
        assert_eq!(parse(&msg[..10], 3).unwrap(), Reply::Other);
        assert!(parse(&header(16, 99, 3), 3).is_err(), "unknown type");
    }

    proptest::proptest! {
        /// Whatever comes back, parsing ends with an answer or an error,
        /// never a panic or a loop.
        #[test]
        fn parse_never_panics(buf in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300), seq: u32) {
            let _ = parse(&buf, seq);
        }
    }

    fn so_cookie(s: &TcpStream) -> u64 {
        use std::os::fd::AsRawFd as _;
        let mut cookie = 0u64;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        // SAFETY: getsockopt(2) writing at most `len` bytes into `cookie`.
        let rc = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_COOKIE,
                (&raw mut cookie).cast(),
                &raw mut len,
            )
        };
        assert_eq!(rc, 0, "SO_COOKIE: {}", io::Error::last_os_error());
        cookie
    }

    #[test]
    fn self_test_passes_here() {
        self_test().expect("sock_diag works on the test machine");
    }

    /// Any user may ask about sockets in its own network namespace.
    #[test]
    fn finds_a_live_loopback_socket_and_not_a_closed_one() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let server_addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(server_addr).unwrap();
        let (accepted, peer) = listener.accept().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());

        let client_cookie = socket_cookie(peer, server_addr).unwrap().expect("client");
        let accepted_cookie = socket_cookie(server_addr, peer).unwrap().expect("accepted");
        assert_ne!(client_cookie, accepted_cookie, "two ends, two sockets");
        let want = so_cookie(&client);
        assert_eq!(client_cookie, want);
        // Asked again on the same thread's socket: same answer.
        assert_eq!(socket_cookie(peer, server_addr).unwrap(), Some(want));

        drop(accepted);
        drop(client);
        // The client end closed first (it sent the FIN after the server), so
        // it may linger in TIME_WAIT or be gone; a made-up port is not there.
        let nowhere: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(socket_cookie(nowhere, server_addr).unwrap(), None);
    }
}
