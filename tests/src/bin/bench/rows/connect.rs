//! Row 5: what the cgroup programs cost a connection that is not to a
//! provider. A client in the clients cgroup runs a tight loop of
//! socket / connect / close (SO_LINGER 0, so no TIME_WAIT piles up) against
//! a loopback listener of its own, in batches; phases alternate between the
//! agent running (programs attached to the cgroup: connect4, sock_ops,
//! sock_release run on every connection) and the agent stopped (nothing
//! attached). Figure: median time per connect over the batches.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::{Value, json};

use super::Row;
use crate::env::Env;
use crate::report::{Figure, Goal};
use crate::stats::{floats, median, quantile};

pub struct Connect;

/// connect() at most this much slower with the programs attached (%).
const MAX_OVERHEAD: f64 = 3.0;
const BATCH: u64 = 1000;

impl Row for Connect {
    fn id(&self) -> &'static str {
        "connect"
    }

    fn title(&self) -> &'static str {
        "connect() to a non-provider address"
    }

    fn run(&self, env: &mut Env) -> Result<Vec<Figure>> {
        let (pairs, iterations) = if env.quick { (3, 15_000) } else { (6, 30_000) };
        let spec = json!({"iterations": iterations, "batch": BATCH, "max_secs": 60});
        // Per pair of adjacent phases (order D A, A D, D A, ...): the
        // median batch of each, and their ratio; drift between pairs
        // cancels out of the ratios.
        let mut medians = [Vec::new(), Vec::new()];
        let mut ratios = Vec::new();
        let mut batches = 0;
        for p in 0..pairs {
            let order = if p % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            };
            let mut m = [0f64; 2];
            for attached in order {
                if attached {
                    env.ensure_agent()?;
                } else {
                    env.stop_agent();
                }
                let out = env
                    .spawn_client(self.id(), &spec)?
                    .finish(Duration::from_secs(120))?;
                let b = floats(&out["ns_per_connect"]);
                batches += b.len();
                m[usize::from(attached)] = median(&b);
            }
            medians[0].push(m[0]);
            medians[1].push(m[1]);
            ratios.push(m[1] / m[0]);
        }
        env.stop_agent();
        let (d, a) = (median(&medians[0]), median(&medians[1]));
        let spread = |v: &[f64]| {
            format!(
                "{:.1}..{:.1} %",
                100.0 * (quantile(v, 0.0) - 1.0),
                100.0 * (quantile(v, 1.0) - 1.0)
            )
        };
        Ok(vec![
            Figure::info("detached: connect+close", d / 1000.0, "us").note(format!(
                "{batches} batches of {BATCH} in {} phases",
                2 * pairs
            )),
            Figure::info("attached: connect+close", a / 1000.0, "us"),
            Figure::goal(
                "connect() slower when attached",
                100.0 * (median(&ratios) - 1.0),
                "%",
                Goal::AtMost(MAX_OVERHEAD),
            )
            .note(format!(
                "median of {pairs} adjacent-phase pairs; pairs ranged {}",
                spread(&ratios)
            )),
        ])
    }

    fn client(&self, spec: Value, emit: &mut dyn FnMut(Value)) -> Result<()> {
        let iterations = spec["iterations"].as_u64().unwrap_or(10_000);
        let batch = spec["batch"].as_u64().unwrap_or(BATCH).max(1);
        let max = Duration::from_secs(spec["max_secs"].as_u64().unwrap_or(30));
        let (listener, addr) = listen()?;
        // The accept side only drains the queue; it never blocks connect().
        std::thread::spawn(move || {
            loop {
                let fd =
                    unsafe { libc::accept(listener, std::ptr::null_mut(), std::ptr::null_mut()) };
                if fd >= 0 {
                    unsafe { libc::close(fd) };
                }
            }
        });
        let deadline = Instant::now() + max;
        // The first batch warms caches up and is not reported.
        let mut out = Vec::new();
        for b in 0..=(iterations / batch) {
            if Instant::now() > deadline {
                break;
            }
            let t = Instant::now();
            for _ in 0..batch {
                connect_close(&addr)?;
            }
            if b > 0 {
                out.push(t.elapsed().as_nanos() as f64 / batch as f64);
            }
        }
        emit(json!({"ns_per_connect": out}));
        Ok(())
    }
}

/// A listening socket on 127.0.0.1 with the largest backlog the kernel allows.
fn listen() -> Result<(i32, libc::sockaddr_in)> {
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            bail!("socket: {}", std::io::Error::last_os_error());
        }
        let mut sa: libc::sockaddr_in = std::mem::zeroed();
        sa.sin_family = libc::AF_INET as u16;
        sa.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
        let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
        if libc::bind(fd, (&raw const sa).cast(), len) != 0 || libc::listen(fd, 65535) != 0 {
            bail!("bind/listen: {}", std::io::Error::last_os_error());
        }
        let mut got: libc::sockaddr_in = std::mem::zeroed();
        let mut l = len;
        libc::getsockname(fd, (&raw mut got).cast(), &mut l);
        Ok((fd, got))
    }
}

/// socket(), SO_LINGER 0, connect(), close(): one non-provider connection.
fn connect_close(addr: &libc::sockaddr_in) -> Result<()> {
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            bail!("socket: {}", std::io::Error::last_os_error());
        }
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as u32,
        );
        let r = libc::connect(
            fd,
            (addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        );
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if r != 0 {
            bail!("connect: {err}");
        }
    }
    Ok(())
}
