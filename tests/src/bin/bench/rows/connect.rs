//! Row 5: what the cgroup programs cost a connection that is not to a
//! provider. A client in the clients cgroup runs a tight loop of
//! socket / connect / close (SO_LINGER 0, so no TIME_WAIT piles up) against
//! a loopback listener of its own, in batches, for the whole row. Meanwhile
//! the bench attaches the agent's programs to that cgroup and detaches them
//! again every [`WINDOW`], through the agent's own intercept module (the
//! code `tollgate run` uses; connect4/6, sendmsg4/6 and getpeername4/6,
//! with the provider address in the target map). Each batch is classed by the state it ran in from start to end
//! (batches that straddle an attach or a detach are dropped); each pair of
//! adjacent windows gives a ratio of median batches, and the figure is the
//! median ratio. Windows a fraction of a second apart see the same host,
//! so its drift, which swung phase-long comparisons by tens of percent,
//! cancels out.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tollgate::intercept::{Intercept, InterceptSettings};

use super::Row;
use crate::env::Env;
use crate::report::{Figure, Goal};
use crate::stats::{median, quantile};

pub struct Connect;

/// connect() at most this much slower with the programs attached (%).
const MAX_OVERHEAD: f64 = 3.0;
const BATCH: u64 = 200;
/// How long the programs stay attached, then detached.
const WINDOW: Duration = Duration::from_millis(400);

/// CLOCK_MONOTONIC in ns: the same clock in the bench and the client.
fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Row for Connect {
    fn id(&self) -> &'static str {
        "connect"
    }

    fn title(&self) -> &'static str {
        "connect() to a non-provider address"
    }

    fn run(&self, env: &mut Env) -> Result<Vec<Figure>> {
        let secs = if env.quick { 12 } else { 40 };
        // Nothing else attached to the clients cgroup meanwhile.
        env.stop_agent();
        // Only provider connects would go to port 9; the client makes none.
        let settings =
            InterceptSettings::new(env.clients.path().to_path_buf(), Ipv4Addr::LOCALHOST, 9);
        let targets = BTreeSet::from([env.provider]);
        let spec = json!({"secs": secs, "batch": BATCH});
        let mut client = env.spawn_client(self.id(), &spec)?;
        // The client's first line: it is listening and about to loop.
        client.next(Duration::from_secs(30))?;
        // [begin, end) of each attached span, as the bench saw it: from
        // before the first program is attached to after the last one is
        // detached.
        let mut attached: Vec<(u64, u64)> = Vec::new();
        while !client.exited() {
            let begin = mono_ns();
            let intercept = Intercept::attach(&settings).context("attaching the programs")?;
            intercept
                .set_targets(&targets)
                .context("writing the target map")?;
            std::thread::sleep(WINDOW);
            drop(intercept);
            // Loading and attaching count as attached time for classing,
            // so a batch that overlaps them is dropped, not misfiled.
            attached.push((begin, mono_ns()));
            std::thread::sleep(WINDOW);
        }
        let out = client.finish(Duration::from_secs(30))?;
        let batches: Vec<[f64; 3]> =
            serde_json::from_value(out["batches"].clone()).context("the client's batches")?;
        // Windows in time order: (attached?, ns per connect of each batch).
        let mut windows: Vec<(bool, Vec<f64>)> = Vec::new();
        let mut dropped = 0;
        for &[t0, t1, ns] in &batches {
            // A batch with an attach or a detach inside it is dropped; the
            // others ran in one state throughout, the one at their start.
            let mut changes = attached.iter().flat_map(|&(b, e)| [b as f64, e as f64]);
            if changes.any(|c| t0 < c && c <= t1) {
                dropped += 1;
                continue;
            }
            let on = attached
                .iter()
                .any(|&(b, e)| t0 >= b as f64 && t0 < e as f64);
            match windows.last_mut() {
                Some((s, v)) if *s == on => v.push(ns),
                _ => windows.push((on, vec![ns])),
            }
        }
        let medians: Vec<(bool, f64)> = windows.iter().map(|(s, v)| (*s, median(v))).collect();
        // Each attached window against the detached window before it.
        let ratios: Vec<f64> = medians
            .windows(2)
            .filter(|w| !w[0].0 && w[1].0)
            .map(|w| w[1].1 / w[0].1)
            .collect();
        if ratios.len() < 3 {
            bail!(
                "only {} attached/detached window pairs in {} batches",
                ratios.len(),
                batches.len()
            );
        }
        let of = |attached: bool| {
            let v: Vec<f64> = medians
                .iter()
                .filter(|m| m.0 == attached)
                .map(|m| m.1)
                .collect();
            median(&v)
        };
        let (d, a) = (of(false), of(true));
        let spread = format!(
            "{:.1}..{:.1} %",
            100.0 * (quantile(&ratios, 0.0) - 1.0),
            100.0 * (quantile(&ratios, 1.0) - 1.0)
        );
        Ok(vec![
            Figure::info("detached: connect+close", d / 1000.0, "us").note(format!(
                "{} batches of {BATCH} over {secs} s, {dropped} dropped across an attach or detach",
                batches.len()
            )),
            Figure::info("attached: connect+close", a / 1000.0, "us"),
            Figure::goal(
                "connect() slower when attached",
                100.0 * (median(&ratios) - 1.0),
                "%",
                Goal::AtMost(MAX_OVERHEAD),
            )
            .note(format!(
                "median of {} pairs of adjacent {} ms windows; pairs ranged {spread}",
                ratios.len(),
                WINDOW.as_millis()
            )),
        ])
    }

    fn client(&self, spec: Value, emit: &mut dyn FnMut(Value)) -> Result<()> {
        let secs = spec["secs"].as_u64().unwrap_or(10);
        let batch = spec["batch"].as_u64().unwrap_or(BATCH).max(1);
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
        // Warm up, then tell the bench the loop starts.
        for _ in 0..batch {
            connect_close(&addr)?;
        }
        emit(json!({"ready": true}));
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut out = Vec::new();
        while Instant::now() < deadline {
            let t0 = mono_ns();
            for _ in 0..batch {
                connect_close(&addr)?;
            }
            let t1 = mono_ns();
            out.push([t0 as f64, t1 as f64, (t1 - t0) as f64 / batch as f64]);
        }
        emit(json!({"batches": out}));
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
